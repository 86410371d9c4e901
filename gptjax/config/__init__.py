"""The configuration layer (imports nothing else of gptjax): typed run configs with each field's role, the choice
types, presets as data, the one config builder, and the constants every other layer names (mesh / logical axes,
dtypes)."""

from gptjax.config.build import apply_overrides, build_config_dict, build_run_config, load_config_file
from gptjax.config.dtypes import DTYPE_NAMES, DType
from gptjax.config.presets import MODEL_PRESETS, RUN_PRESETS, model_preset, run_preset
from gptjax.config.schema import (AttentionImpl, AttentionPattern, ConfigError, ContextStrategy, DataConfig,
                                  MeshConfig, Mlp, ModelConfig, Norm, OptimConfig, Optimizer, Positions, Remat,
                                  Role, RunConfig, Schedule, TrainConfig, batch_shards, check_choices, choices,
                                  fields_with_role, role_field, role_of)

__all__ = ["AttentionImpl", "AttentionPattern", "ConfigError", "ContextStrategy", "DTYPE_NAMES", "DType",
           "DataConfig", "MeshConfig", "Mlp", "ModelConfig", "Norm", "OptimConfig", "Optimizer", "Positions",
           "Remat", "Role", "RunConfig", "Schedule", "TrainConfig", "MODEL_PRESETS", "RUN_PRESETS",
           "apply_overrides", "batch_shards", "build_config_dict", "build_run_config", "check_choices", "choices",
           "fields_with_role", "load_config_file", "model_preset", "role_field", "role_of", "run_preset"]
