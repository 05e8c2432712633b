"""Shared start-up for the stage scripts: logging, params.yaml, and one-line errors for expected failures."""

from __future__ import annotations

from pipeline.config import Config, load_config
from pipeline.errors import expected_errors
from pipeline.utils import setup_logging

__all__ = ["expected_errors", "start"]


def start(params: str = "params.yaml") -> Config:
    setup_logging()
    with expected_errors():
        return load_config(params)
