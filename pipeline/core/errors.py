"""Expected failures: bad input a user can fix. Stages and the CLI turn each into one line naming the problem.

Every project error derives from `SipatError`, so one handler (`expected_errors`) serves every entry point.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Iterator, Optional


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
    except OSError as err:
        text = storage_error(err)
        if text is None:
            raise
        sys.exit(f"error: {text}")
    except RuntimeError as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if "inline_container" not in str(err) and "file write failed" not in str(err):
            raise
        sys.exit(f"error: a file could not be written (is the disk full?): {str(err).splitlines()[0]}; nothing "
                 f"was written to the stage's outputs")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written to the stage's outputs")


_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOTDIR: "a folder on the path is a file"}


def storage_error(err: OSError) -> Optional[str]:
    """One line for a write the disk or the permissions refused (None for any other OSError)."""
    import os

    why = _STORAGE.get(err.errno or -1)
    if why is None:
        return None
    detail = f" ({err.strerror})" if err.strerror and err.strerror != os.strerror(err.errno) else ""
    where = f" writing {err.filename}" if err.filename else ""
    return f"{why}{where}{detail}; nothing was written to the outputs (free space, or choose another path)"
