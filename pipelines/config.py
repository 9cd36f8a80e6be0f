"""Compose the Hydra tree in `conf/` with command-line overrides and validate it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.config import ConfigError, OmniConfig, parse_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_config(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> OmniConfig:
    """`overrides` are Hydra's `key=value` / `group=option` strings, e.g. `stages.sft.steps=10`."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override: {err}. Use key=value for existing keys, +key=value to add one.") from None
    return parse_config(OmegaConf.to_container(cfg, resolve=True))
