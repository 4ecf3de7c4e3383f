"""Shared test setup: CPU only, quiet TensorFlow, a compilation cache, the repo importable.

The persistent compilation cache lets the many tests (and their subprocesses) that jit
the same tiny model reuse one compiled executable instead of recompiling it each time.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, ROOT)
