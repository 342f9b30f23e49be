"""Test setup: 8 simulated CPU devices, set before JAX starts, so sharding tests run anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models for a step or two, so XLA's optimisation passes cost far more than they
# save (about half the suite's time is compilation). Subprocesses inherit the setting; set the
# variable to 0 to test the optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA's default CPU kernels, not the faster-at-scale ones `import vqjax` picks (vqjax/__init__.py):
# they compile the tests' tiny programs 10-25% sooner. tests/test_layers.py checks the
# stride-2 forms with vqjax's choice in a subprocess.
os.environ.setdefault("VQJAX_XLA_CPU_DEFAULTS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
