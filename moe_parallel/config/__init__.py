"""Typed run configuration: schema, YAML loading with overrides, validation rules."""

from .load import ConfigError, config_from_dict, dump_config, load_config, model_fingerprint
from .rules import check_world_size, resolve_device, uses_transformer_engine
from .schema import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "check_world_size",
    "config_from_dict",
    "dump_config",
    "load_config",
    "model_fingerprint",
    "resolve_device",
    "uses_transformer_engine",
]
