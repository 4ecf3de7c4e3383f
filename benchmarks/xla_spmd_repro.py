"""Minimal XLA SPMD-partitioner miscompile: one sharded matmul returns permuted rows.

    python benchmarks/xla_spmd_repro.py            # Shardy (the default partitioner)
    python benchmarks/xla_spmd_repro.py --gspmd    # the same wrong number with GSPMD

On a 2x2x2 mesh ("a", "b", "c") = (data, fsdp, tensor), `y @ w` with
  y:   P(("a", "b"), "c")   batch over (data, fsdp), contracting dim over tensor
  w:   P("c", "b")          a row-parallel kernel: rows over tensor, columns over fsdp (FSDP)
  out: P(("a", "b"), "c")   (in a model: set by an elementwise op with a tensor-split operand)
is wrong. The partitioned HLO collective-permutes y's batch blocks between devices
(0,1,*) and (1,0,*), all-gathers w over "b", does the dot and an all-reduce over "c", but
never permutes the rows back, so batch rows 2-3 and 4-5 of the result are swapped. Only
that combination fails; it also fails for meshes (3, 2, 2) and (4, 2, 2), but not when
|b| != |c| or when the batch is split over ("b", "a") instead. The
partitioner is platform-independent, so the bug is not CPU-specific. Seen with jax/jaxlib 0.10.2.
Prints the max-abs error (~1e-6 expected, ~7 observed) and exits 1 when it is wrong.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main() -> int:
    if "--gspmd" in sys.argv:
        jax.config.update("jax_use_shardy_partitioner", False)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("a", "b", "c"))
    s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    y = jax.random.normal(jax.random.key(0), (8, 8))
    w = jax.random.normal(jax.random.key(1), (8, 8))
    f = jax.jit(lambda y, w: y @ w, out_shardings=s(("a", "b"), "c"))
    out = f(jax.device_put(y, s(("a", "b"), "c")), jax.device_put(w, s("c", "b")))
    err = float(jnp.max(jnp.abs(out - y @ w)))
    print(f"jax {jax.__version__}: max abs error of sharded y @ w = {err:.3g}")
    return int(err > 1e-4)


if __name__ == "__main__":
    sys.exit(main())
