"""gptjax: pretraining GPT-family decoder-only language models with JAX and Flax NNX.

Layers (each imports only those before it; ``tests/test_layering.py`` enforces it):
``config`` -> ``sharding`` -> ``model`` -> {``checkpoint``, ``inference``, ``evals``, ``interop``} -> ``training``
-> ``cli``; ``runs`` (the run directory) needs only ``config``, ``data`` and ``reporting`` only ``config`` and
``runs``; ``planning`` and ``scaling`` consume the others and only the CLI imports them.
"""

from gptjax.config import (MODEL_PRESETS, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig,
                           RunConfig, TrainConfig, build_run_config, model_preset)

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "MODEL_PRESETS", "build_run_config", "model_preset"]
