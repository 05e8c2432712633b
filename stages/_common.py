"""Shared start-up for the stage scripts: logging, params.yaml, and one-line errors for expected failures."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from pipeline.config import Config, ConfigError, load_config
from pipeline.utils import setup_logging


def start(params: str = "params.yaml") -> Config:
    setup_logging()
    try:
        return load_config(params)
    except ConfigError as err:
        sys.exit(f"error: {err}")


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """Bad data, a wrong mask store or a diverged run end the stage with one line naming the problem."""
    from pipeline.data import DatasetError
    from pipeline.maskstore import MaskStoreError
    from pipeline.training import TrainingDiverged

    try:
        yield
    except (ConfigError, DatasetError, MaskStoreError, TrainingDiverged, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
