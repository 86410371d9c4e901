"""gptjax: pretraining GPT-family decoder-only language models with JAX and Flax NNX.

Layers (each imports only those before it; ``tests/test_layering.py`` enforces it):
``config`` -> ``sharding`` -> ``model`` -> {``checkpoint``, ``inference``, ``evals``, ``interop``} -> ``training``
-> ``cli``; ``runs`` (the run directory) needs only ``config``, ``data`` and ``reporting`` only ``config`` and
``runs``; ``planning`` and ``scaling`` consume the others and only the CLI imports them.

The names below are imported on first use (``from gptjax import RunConfig``): importing the package itself is
free, so that a console script installs its Ctrl-C handling before the second of imports under it
(``gptjax.cli``); an eager import here left that second to Python's default handler, a traceback in CI.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "MODEL_PRESETS", "build_run_config", "model_preset"]


def __getattr__(name: str):
    if name in __all__:
        import gptjax.config

        return getattr(gptjax.config, name)
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
