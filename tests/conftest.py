"""Test-session set-up: flags that must be in place before JAX initializes its backend.

* 8 simulated CPU devices, for the sharding tests (meshes 8, 4x2, 2x2x2);
* XLA's CPU backend at optimization level 0: test shapes are tiny, so compiling (seconds per
  program at full optimization) costs far more than running; this keeps the suite fast.
  Benchmarks never import this file and run fully optimized.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
