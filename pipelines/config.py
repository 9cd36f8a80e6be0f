"""Compose the Hydra tree in `conf/` with command-line overrides and validate it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.config import ConfigError, OmniConfig, parse_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def schema_override(override: str, conf_dir: Path = CONF_DIR) -> str:
    """`key=value` for any key the schema knows, written in the tree or not (defaults live in the
    pydantic models): Hydra's `++` sets it either way, and the schema then refuses unknown keys by
    name. Group choices (`model=omni-7b`) and explicit `+`/`~` overrides pass through unchanged."""
    key, sep, _ = override.partition("=")
    if not sep or key.startswith(("+", "~")) or (conf_dir / key.split("@")[0]).is_dir():
        return override
    return "++" + override


def load_config(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> OmniConfig:
    """`overrides` are Hydra's `key=value` / `group=option` strings, e.g. `stages.sft.steps=10`."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=[schema_override(o, conf_dir) for o in overrides or []])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override: {err}") from None
    return parse_config(OmegaConf.to_container(cfg, resolve=True))
