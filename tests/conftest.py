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
# Every executable, the many sub-second ones too (eager ops, small jits): a subprocess
# reads them back instead of compiling them again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite compiles hundreds of small programs and runs each a few times, so XLA:CPU's
# cheap compile options (those task=plan uses) take about 30% off its time; subprocesses
# (xdist's workers too) inherit them, and tests/devices.py keeps them beside a simulated
# device count.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
sys.path.insert(0, ROOT)

# Files that take minutes go first, longest first (`--durations`), so the two xdist
# workers finish together instead of one running a long file alone at the end; the README's
# command keeps this order with --no-loadscope-reorder (xdist's default sorts files by
# their number of tests).
SLOW_FILES_FIRST = ("test_toy_pipeline.py", "test_robustness.py", "test_train.py",
                    "test_multihost.py", "test_benchmarks_smoke.py", "test_flux_world.py",
                    "test_parallel.py", "test_toy_world.py", "test_flux.py",
                    "test_sharded_loading.py",
                    "test_baselines.py", "test_lora_training.py", "test_plan.py",
                    "test_autoencoder.py", "test_rewards.py", "test_anchor.py",
                    "test_reference.py", "test_flux_pipeline.py", "test_tasks.py",
                    "test_lora.py", "test_flow.py", "test_clip.py", "test_leapalign.py",
                    "test_t5.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
