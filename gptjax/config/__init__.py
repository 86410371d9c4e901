"""The configuration layer (imports nothing else of gptjax): typed run configs, presets as data, the one config
builder, and the constants every other layer names (mesh / logical axes, dtypes)."""

from gptjax.config.build import apply_overrides, build_config_dict, build_run_config, load_config_file
from gptjax.config.presets import MODEL_PRESETS, RUN_PRESETS, model_preset, run_preset
from gptjax.config.schema import (ATTENTION_IMPLS, ConfigError, DataConfig, MeshConfig, ModelConfig, OptimConfig,
                                  RunConfig, TrainConfig)

__all__ = ["ATTENTION_IMPLS", "ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "TrainConfig", "MODEL_PRESETS", "RUN_PRESETS", "apply_overrides", "build_config_dict",
           "build_run_config", "load_config_file", "model_preset", "run_preset"]
