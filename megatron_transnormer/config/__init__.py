"""One config system: YAML + `key=value` overrides, validated into dataclasses."""
from .loader import (available_configs, config_from_dict, config_to_dict, config_warnings, describe_keys,
                     load_config, option_habit, override_keys, resolve_config_path)
from .schema import (Config, ConfigError, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig,
                     TrainConfig, check_sequence_length, validate_config)

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "ParallelConfig",
    "TrainConfig", "available_configs", "check_sequence_length", "config_from_dict",
    "config_to_dict", "config_warnings", "describe_keys", "load_config", "option_habit", "override_keys",
    "resolve_config_path", "validate_config",
]
