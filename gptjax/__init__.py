"""gptjax: pretraining GPT-family decoder-only language models with JAX and Flax NNX."""

from gptjax.config import (ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig,
                           TrainConfig)
from gptjax.presets import MODEL_PRESETS, model_preset

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "MODEL_PRESETS", "model_preset"]
