"""Test-session set-up: flags that must be in place before JAX initializes its backend.

* 8 simulated CPU devices, for the sharding tests (meshes 8, 4x2, 2x2x2);
* XLA's CPU backend at optimization level 0: test shapes are tiny, so compiling (seconds per
  program at full optimization) costs far more than running; this keeps the suite fast.
  Benchmarks never import this file and run fully optimized.
"""

import os


_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()

import pytest

# The fast tier (`pytest -m "not slow"`, the inner loop; under 5 minutes on 2 cores) leaves out
# what the README command still runs: notebooks, multi-device and multi-process runs, training
# runs, the interpret-mode kernel suites (one kernel test of each family stays fast), parity
# sweeps and the heaviest composite checks. Everything else marks itself with @pytest.mark.slow.
SLOW = (
    "tests/test_notebooks.py::",
    "tests/parallel/",
    "tests/ops/test_attention_parity.py::",
    "::TestPallas::",
    "tests/test_project.py::test_gpu_benchmark_dry_run_on_cpu",
    "tests/test_project.py::test_cpu_benchmark_smoke",
    "tests/ops/test_neighborhood.py::TestXla::test_awkward_shapes_slow",
    "tests/ops/test_vision.py::test_agent_xla_matches_reference[B2T63S100H4K2D12E20-True]",
    "tests/ops/test_vision.py::test_vision_blocks_are_their_ops_and_train[l2vit]",
    "tests/ops/test_sparse.py::test_hyper_error_falls_with_sample_size",
    "tests/ops/test_linear.py::test_random_features_approximate_softmax",
    "tests/ops/test_gated.py::test_moh_skipping_equals_dense[prefix_lm]",
    "tests/test_project.py::test_readme_python_blocks_run",
    # doctests whose examples compile a whole routed / sharded pipeline
    "attnjax/ops/sparse/", "attnjax/nn/routing.py::", "attnjax/parallel/api.py::",
)
# The variant zoo (ZOO_SPECS: dozens of composite variants, each with its own test file): the full
# suite runs it; while working on a variant, run its file (`pytest tests/ops/test_scored.py`).
ZOO = (
    "tests/ops/test_vision_", "tests/nn/test_vision_", "tests/nn/test_cnn.py", "tests/ops/test_longctx",
    "tests/ops/test_scored", "tests/ops/test_kernelized.py", "tests/ops/test_heads.py", "tests/nn/test_zoo",
    "attnjax/ops/kernelized/", "attnjax/ops/scored/", "attnjax/ops/heads/", "attnjax/ops/gathered/",
    "attnjax/nn/cnn/", "attnjax/nn/vision_", "attnjax/nn/deformable.py", "attnjax/nn/scored.py",
    "attnjax/nn/heads.py", "attnjax/nn/pooling.py", "attnjax/nn/skim.py", "attnjax/nn/shrp.py",
    "tests/ops/test_classic.py", "tests/nn/test_classic_nn.py", "attnjax/ops/classic/", "attnjax/nn/classic.py",
    "attnjax/nn/fit.py", "attnjax/nn/graph.py", "attnjax/nn/set_transformer.py",
)
FAST_EXPERIMENTS = ("test_bad_configs",)  # config checks; the training runs are slow
# A parametrized check of an op or module compiles a program per case: the fast tier keeps the first
# FAST_CASES cases of each (parameter lists put their most telling cases first) and the full suite
# runs them all. Mask and core cases are plain Python on tiny arrays and all stay fast.
FAST_CASES = 2
ALL_CASES = ("tests/masks/", "tests/core/")


def pytest_collection_modifyitems(config, items):
    cases: dict[str, int] = {}
    for item in items:
        nodeid = item.nodeid
        training = nodeid.startswith("tests/test_experiments.py::") and not any(f in nodeid for f in FAST_EXPERIMENTS)
        function = nodeid.partition("[")[0]
        if function != nodeid and not nodeid.startswith(ALL_CASES):
            cases[function] = cases.get(function, 0) + 1
        later_case = cases.get(function, 0) > FAST_CASES
        # Real accelerator compiles (marker compile, CI's second step) are never in the fast tier.
        zoo = nodeid.startswith(ZOO)
        if training or later_case or zoo or item.get_closest_marker("compile") or any(p in nodeid for p in SLOW):
            item.add_marker(pytest.mark.slow)
