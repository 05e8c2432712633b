"""Expected failures: bad input a user can fix. Stages and the CLI turn each into one line naming the problem.

Every project error derives from `SipatError`, so one handler (`expected_errors`) serves every entry point.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class SipatError(Exception):
    """Base of every expected failure: the message names the file, key or index at fault."""


class ConfigError(SipatError, ValueError):
    """A parameter file that does not describe a valid run."""


class DatasetError(SipatError, RuntimeError):
    """A dataset root, index file or image that cannot be used."""


class MaskStoreError(SipatError, RuntimeError):
    """A mask store that is missing, damaged or made for another run."""


class CheckpointError(SipatError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the configured run."""


class TrainingDiverged(SipatError, RuntimeError):
    """A non-finite loss; the message names the epoch and batch."""


class OutputConflict(SipatError, RuntimeError):
    """An output path that holds something this project did not write there."""


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """End the process with `error: <message>` (exit status 1) on an expected failure or Ctrl-C."""
    try:
        yield
    except (SipatError, FileNotFoundError) as err:  # a missing input file names itself
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written to the stage's outputs")
