"""Configuration: TOML models, loading, ${ENV} secrets and located error messages."""

from dispatcher.config.loader import Config, StageTemplates, load_config
from dispatcher.config.models import CampaignConfig, ChannelConfig, StageConfig

__all__ = [
    "CampaignConfig",
    "ChannelConfig",
    "Config",
    "StageConfig",
    "StageTemplates",
    "load_config",
]
