"""Small shared helpers: devices, seeding, atomic file output, logging."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: the stages that only hash files skip its ~2 s import
    import torch

from pipeline.core import errors as _errors
from pipeline.core.errors import ConfigError, OutputConflict

log = logging.getLogger("sipat")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


CPU_BUDGET_VARS = ("SIPAT_CPUS", "SLURM_CPUS_PER_TASK")


def cpu_budget() -> Optional[int]:
    """Cores this process may use, when something above it decided: `SIPAT_CPUS` (set by `sipat grid` for the
    runs it starts side by side) or SLURM's allocation (`SLURM_CPUS_PER_TASK`); None when nobody did."""
    for var in CPU_BUDGET_VARS:
        raw = os.environ.get(var, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"environment variable {var}={raw!r}: expected a whole number of cores") from None
            if value < 1:
                raise ConfigError(f"environment variable {var}={raw!r}: expected at least 1 core")
            return value
    return None


def limit_threads() -> Optional[int]:
    """Hold torch's intra-op threads to the CPU budget, if one is set: runs that share cores would otherwise
    each start one thread per core and slow one another down many times over."""
    budget = cpu_budget()
    if budget is not None:
        import torch

        torch.set_num_threads(budget)
    return budget


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available on this machine (use auto or cpu)")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# Kinds of file this project writes, told apart by their first bytes (or, for JSON and text, by parsing).
_SUFFIX_KINDS = {".png": "png", ".pt": "torch", ".pth": "torch", ".json": "json", ".md": "text"}
_KIND_NAMES = {"png": "PNG image", "torch": "PyTorch checkpoint", "json": "JSON file", "text": "text file"}
# mkdtemp names: prefix, 8 characters from this alphabet, suffix (see tempfile._RandomNameSequence).
_TMP_RANDOM = "[a-z0-9_]{8}"
_OWNER_FILE = ".sipat-owner"

# The mark that every file this project writes carries, so that it replaces only its own files (a user's file
# of the same format is never replaced): a PNG text chunk, a JSON key, a Markdown comment; checkpoints and
# resume states carry a "format" value that starts with "sipat-".
MARK_KEY, MARK_VALUE = "written_by", "sipat"
PNG_MARK = {MARK_KEY: MARK_VALUE}  # savefig(..., metadata=PNG_MARK)
TEXT_MARK = f"<!-- {MARK_KEY} {MARK_VALUE} -->"


def _sniff(path: Path) -> Optional[str]:
    """The kind of a regular file this project could have written, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"\x89PNG\r\n\x1a\n"):
                return "png"
            if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
                return "torch"
            f.seek(0)
            data = f.read(64 << 20)
    except OSError:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        json.loads(text)
        return "json"
    except ValueError:
        return "text"


def _torch_marked(path: Path) -> bool:
    """A torch.save archive whose pickle holds a "sipat-..." format tag (read without unpickling anything)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if name is None or z.getinfo(name).file_size > 64 << 20:
                return False
            return re.search(rb"sipat-[a-z]+-v\d", z.read(name)) is not None
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_marked(path: str | Path, kind: Optional[str] = None) -> bool:
    """Whether the file at `path` carries this project's mark (see MARK_KEY), i.e. this project wrote it."""
    path = Path(path)
    kind = kind or _sniff(path)
    try:
        if kind == "png":
            from PIL import Image

            with Image.open(path) as im:
                return getattr(im, "text", {}).get(MARK_KEY) == MARK_VALUE
        if kind == "torch":
            return _torch_marked(path)
        if kind == "json":
            obj = json.loads(path.read_text())
            return isinstance(obj, dict) and obj.get(MARK_KEY) == MARK_VALUE
        if kind == "text":
            return TEXT_MARK in path.read_text()
    except (OSError, ValueError, SyntaxError):  # PIL: SyntaxError for a broken PNG
        return False
    return False


def foreign_entries(folder: Path, expected: Callable[[Path], bool]) -> list[str]:
    """Entries under `folder` (files and links, relative paths) that `expected` does not recognise as this
    project's: replacing the folder would delete them."""
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder)
        if not expected(rel):
            out.append(str(rel))
    return out


def _store_entry(rel: Path) -> bool:
    """What a Zarr v3 mask store of this project holds: its zarr.json and chunks under c/ named by numbers."""
    parts = rel.parts
    return rel == Path("zarr.json") or (len(parts) >= 2 and parts[0] == "c" and all(p.isdigit() for p in parts[1:]))


def is_sipat_store(path: Path) -> bool:
    """A Zarr array whose attributes carry this project's format tag, holding nothing but the store itself."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(meta, dict) and str(meta.get("attributes", {}).get("format", "")).startswith("sipat-")):
        return False
    foreign = foreign_entries(Path(path), _store_entry)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputConflict(f"{path} is a mask store of this project, but also holds {shown}, which this project "
                             f"did not write; move them out (replacing the store would delete them)")
    return True


def _check_owned(final: Path, is_dir: bool, kind: Optional[str], owned: Optional[Callable[[Path], bool]]) -> None:
    """Refuse (OutputConflict) to replace anything at `final` that this project did not write there."""
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_symlink() and not final.exists():
        return  # a dangling link: removing it loses nothing
    if final.is_dir():
        if not any(final.iterdir()):
            return  # an empty folder: nothing to lose
        if is_dir and (owned(final) if owned is not None else is_sipat_store(final)):
            return
        if is_dir:
            raise OutputConflict(f"{final} is a folder with files this project did not write; move it away or "
                                 f"choose another output path")
        raise OutputConflict(f"{final} is a folder with files in it, not a {_KIND_NAMES.get(kind or '', 'file')} "
                             f"this project wrote; move it away or choose another output path")
    if is_dir:
        raise OutputConflict(f"{final} is a file, but a folder is to be written there; move it away or choose "
                             f"another output path")
    if owned is not None:
        if owned(final):
            return
        raise OutputConflict(f"{final} exists and is not a file written by this project; move it away or choose "
                             f"another output path")
    expected = kind or _SUFFIX_KINDS.get(final.suffix.lower())
    found = _sniff(final)
    if found is not None and (expected is None or found == expected) and is_marked(final, found):
        return
    what = ("unrecognised content" if found is None else
            f"a {_KIND_NAMES[found]} without this project's mark" if found == expected or expected is None else
            f"it holds a {_KIND_NAMES[found]}")
    raise OutputConflict(f"{final} exists and was not written by this project ({what}); move it away or choose "
                         f"another output path")


def check_output(path: str | Path, *, is_dir: bool = False, kind: Optional[str] = None,
                 owned: Optional[Callable[[Path], bool]] = None, min_free: int = 0) -> None:
    """Fail now, before any work, if `atomic_path` would later refuse to replace `path` (OutputConflict), if its
    folder cannot be written (OSError: read-only, no permission) or has less than `min_free` bytes free."""
    path = Path(path)
    _check_owned(path, is_dir, kind, owned)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    # a real write, not os.access: root passes access checks that a read-only mount still refuses
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        raise OSError(err.errno, f"{path} cannot be written: no file can be created in {folder}", str(path)) from None
    os.close(fd)
    os.unlink(probe)
    if min_free:
        free = shutil.disk_usage(folder).free
        if free < min_free:
            raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free in {folder}, about "
                          f"{min_free / 2**20:.1f} MiB needed", str(path))


def _alive(owner: Path) -> bool:
    """Whether the process that created a temporary folder (pid and host in `owner`) may still be writing."""
    try:
        host, pid = owner.read_text().split()
        pid_n = int(pid)
    except (OSError, ValueError):
        try:  # no owner record: stale unless it was created a moment ago and is being set up now
            return time.time() - owner.parent.stat().st_mtime < 60
        except OSError:
            return False
    if host != socket.gethostname():
        return True  # another machine's process: not ours to judge
    if pid_n == os.getpid():
        return False  # a killed process whose pid this one reuses (common in containers)
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(final: str | Path) -> list[Path]:
    """Remove temporary folders that an earlier, killed write of `final` left beside it (`.NAME.XXXXXXXX.tmp`).

    Only folders with exactly this project's temporary naming for this output are touched, and only when the
    process that made them is gone. Returns the folders removed.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.{_TMP_RANDOM}\.tmp$")
    removed = []
    for cand in final.parent.iterdir():
        if not pattern.match(cand.name) or cand.is_symlink() or not cand.is_dir():
            continue
        if _alive(cand / _OWNER_FILE):
            continue
        shutil.rmtree(cand, ignore_errors=True)
        removed.append(cand)
    if removed:
        log.info("removed %d temporary folder(s) left by an interrupted write of %s", len(removed), final)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path, *, is_dir: bool = False, kind: Optional[str] = None,
                owned: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block finishes.

    An interrupted write leaves no file at `final` that DVC could cache as a finished output. Whatever is at
    `final` is replaced only if this project wrote it, checked before the block runs: a folder must satisfy
    `owned` (default: a mask store of this project) or be empty; a file must satisfy `owned` if given, else be
    of `kind` ("png", "torch", "json", "text"; default: from the suffix) and carry this project's mark
    (`is_marked`); otherwise OutputConflict. Temporary folders of earlier killed writes of `final` are removed
    first.
    """
    final = Path(final)
    _check_owned(final, is_dir, kind, owned)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    (tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    target = tmp / final.name
    if is_dir:
        target.mkdir()
    try:
        yield target
        _check_owned(final, is_dir, kind, owned)  # something may have appeared there meanwhile
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """`obj` as indented JSON, with this project's mark as its first key (a file without it is never replaced)."""
    if not isinstance(obj, dict):
        raise TypeError(f"write_json writes a mapping (it carries the {MARK_KEY!r} mark), got {type(obj).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({MARK_KEY: MARK_VALUE, **obj}, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:limit] if limit else h.hexdigest()


def inside(base: str | Path, rel: str | Path, where: str) -> Path:
    """`base / rel` with every symlink followed; DatasetError naming `where` unless it lies inside `base`.

    Index files are input like any other: an entry may not reach files outside the dataset (an absolute path,
    `..`, or a symlink out of the tree).
    """
    real_base = os.path.realpath(base)
    path = os.path.realpath(os.path.join(real_base, rel))
    if os.path.commonpath([real_base, path]) != real_base:
        raise _errors.DatasetError(f"{where}: {str(rel)!r} leads outside {base} (to {path}); dataset paths must stay "
                           f"inside the dataset root")
    return Path(path)
