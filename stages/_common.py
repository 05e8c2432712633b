"""Shared start-up for the stage scripts: logging and params.yaml."""

from __future__ import annotations

import sys

from pipeline.config import Config, ConfigError, load_config
from pipeline.utils import setup_logging


def start(params: str = "params.yaml") -> Config:
    setup_logging()
    try:
        return load_config(params)
    except ConfigError as err:
        sys.exit(f"error: {err}")
