import os

# The test session runs on the CPU with 8 simulated devices (set before JAX starts). Single-device tests pass
# jax.devices()[:1] (or single_device_mesh()) explicitly; sharding tests build meshes over all 8. Multi-process
# tests start their own processes with 2 devices each. Helpers live in tests/helpers.py, not here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gptjax.data.corpus import default_corpus_path  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first ~300 KB of the embedded Austen corpus (real text, whole chapters)."""
    text = default_corpus_path().read_text(encoding="utf-8")
    cut = text.index("CHAPTER", 300_000)
    path = tmp_path_factory.mktemp("corpus") / "austen_small.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path
