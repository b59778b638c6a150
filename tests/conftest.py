"""Test setup: 8 fake CPU devices (for sharding tests) before JAX initialises its backend."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JSON record indexes of the tests' throwaway files go to a throwaway folder, not ~/.cache
os.environ.setdefault("LLADAV_JAX_INDEX_DIR", tempfile.mkdtemp(prefix="lladav_index_"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
