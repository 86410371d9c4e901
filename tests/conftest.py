import os

# The test session runs on the CPU with 8 simulated devices (set before JAX starts). Single-device tests pass
# jax.devices()[:1] explicitly; sharding tests build meshes over all 8. Multi-process tests start their own
# processes with 2 devices each.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gptjax.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from gptjax.data.corpus import default_corpus_path  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first ~300 KB of the embedded Austen corpus (real text, whole chapters)."""
    text = default_corpus_path().read_text(encoding="utf-8")
    cut = text.index("CHAPTER", 300_000)
    path = tmp_path_factory.mktemp("corpus") / "austen_small.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


def nano_model(**kw) -> ModelConfig:
    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def small_run(run_dir: Path, corpus: Path, **train_kw) -> RunConfig:
    train = dict(run_dir=str(run_dir), steps=12, batch_size=8, seq_len=64, log_every=4, eval_every=6,
                 eval_batches=2, checkpoint_every=6, sample_tokens=0, progress=False, peak_flops=1e11)
    train.update(train_kw)
    return RunConfig(model=nano_model(), data=DataConfig(corpus=str(corpus)),
                     optim=OptimConfig(lr=3e-3, warmup_steps=2), train=TrainConfig(**train))


@pytest.fixture
def replace():
    return dataclasses.replace
