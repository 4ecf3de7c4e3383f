"""XLA_FLAGS for a subprocess with simulated CPU devices, keeping the suite's own flags."""

import os


def xla_flags(devices: int) -> str:
    """The current XLA_FLAGS (conftest's fast-compile options) plus `devices` CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
