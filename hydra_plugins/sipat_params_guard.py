"""Refuse `dvc exp run -S ...` when params.yaml holds edits that the Hydra composition would silently discard.

With `hydra.enabled`, `dvc exp run -S KEY=VALUE` rewrites params.yaml from conf/ plus the overrides, so a
value edited in params.yaml by hand would be lost without a word. DVC imports the Hydra plugins of the
repository (this folder) just before it composes, so this module checks then: params.yaml must be what
conf/ composes to, or a params.yaml that an experiment wrote (a workspace `dvc exp run` leaves its own
behind). Otherwise the run stops with one line naming the keys. Set SIPAT_ALLOW_PARAMS_EDITS=1 to let the
composition replace the edits anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

_SKIP = "SIPAT_ALLOW_PARAMS_EDITS"


def _compose_call() -> Optional[dict[str, Any]]:
    """The arguments of DVC's `compose_and_dump` call that is loading this plugin (None when not under it)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compose_and_dump" and "output_file" in frame.f_locals:
            return frame.f_locals
        frame = frame.f_back
    return None


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def _compose_text(config_dir: str, config_name: str, overrides: list[str]) -> str:
    """params.yaml as DVC's composition writes it, in a separate process (this one is inside DVC's
    composition); raises CalledProcessError when the composition fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        code = ("import sys; from dvc.utils.hydra import compose_and_dump; "
                "compose_and_dump(sys.argv[1], sys.argv[2], None, sys.argv[3], sys.argv[4], sys.argv[5:])")
        subprocess.run([sys.executable, "-c", code, str(out), config_dir, config_name, tmp, *overrides],
                       check=True, env={**os.environ, _SKIP: "1"}, cwd=tmp, capture_output=True)
        return out.read_text()


def _composed(config_dir: str, config_name: str) -> dict[str, Any]:
    """conf/ composed without overrides."""
    import yaml

    return yaml.safe_load(_compose_text(config_dir, config_name, [])) or {}


def _record_path(params: Path) -> Path:
    return params.parent / ".dvc" / "tmp" / "sipat-composed-params.json"


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _recorded(params: Path) -> set[str]:
    import json

    try:
        return set(json.loads(_record_path(params).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def remember(params: Path, config_dir: str, config_name: str, overrides: list[str]) -> None:
    """Record the digest of what this composition is about to write, so that a params.yaml left behind by a
    failed `dvc exp run -S` is known as DVC's, not as the user's edits (the record lives in .dvc/tmp)."""
    import json

    if not (params.parent / ".dvc").is_dir():
        return  # not a DVC project's params.yaml: nothing to record, and no .dvc/ to create
    try:
        text = _compose_text(config_dir, config_name, list(overrides))
    except Exception:  # noqa: BLE001 - a composition that fails writes nothing to remember
        return
    seen = sorted(_recorded(params) | {_digest(text.encode())})[-200:]
    path = _record_path(params)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, path)
    except OSError:
        pass


def _written_by_an_experiment(params: Path) -> bool:
    """params.yaml is, byte for byte, the params.yaml of an experiment commit (DVC's own composition)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=params.parent, capture_output=True, text=True).stdout.strip()

    blob = git("hash-object", str(params))
    if not blob:
        return False
    for commit in git("for-each-ref", "--format=%(objectname)", "refs/exps").split():
        if git("rev-parse", "--verify", "-q", f"{commit}:{params.name}") == blob:
            return True
    return False


def check(output_file: str | Path, config_dir: Optional[str], config_name: str) -> Optional[str]:
    """The one-line refusal, or None when composing loses nothing."""
    import yaml

    params = Path(output_file)
    if config_dir is None or not params.is_file() or params.suffix.lower() not in (".yaml", ".yml"):
        return None
    if _digest(params.read_bytes()) in _recorded(params):
        return None  # written by an earlier composition (a failed `dvc exp run -S` leaves its own behind)
    try:
        current = _flat(yaml.safe_load(params.read_text()) or {})
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        return (f"{params.name} does not parse{line}: `dvc exp run -S` would replace it from "
                f"{Path(config_dir).name}/ and lose whatever it holds. Fix it first, or restore it with "
                f"`git checkout {params.name}` ({_SKIP}=1 lets the composition replace it)")
    try:
        composed = _flat(_composed(config_dir, config_name))
    except Exception:  # noqa: BLE001 - a broken conf/ is reported by the composition itself
        return None
    differ = sorted(k for k in current.keys() | composed.keys() if current.get(k, ...) != composed.get(k, ...))
    if not differ or _written_by_an_experiment(params):
        return None
    shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
    example = next((k for k in differ if k in current), differ[0])
    return (f"{params.name} differs from the composition of {Path(config_dir).name}/ in {shown}: `dvc exp run -S` "
            f"rewrites {params.name} from {Path(config_dir).name}/ and would discard these edits. Put them in "
            f"{Path(config_dir).name}/ (e.g. conf/config.yaml) or pass them with -S (e.g. -S {example}=...), "
            f"or use `dvc repro`, which reads {params.name} as it is (to discard them: {_SKIP}=1)")


def _guard() -> None:
    if os.environ.get(_SKIP) == "1":
        return
    call = _compose_call()
    if call is None:
        return
    msg = check(call["output_file"], call.get("config_dir"), call.get("config_name", "config"))
    if msg is not None:
        from dvc.exceptions import DvcException

        raise DvcException(msg)
    if call.get("config_dir") is not None:
        remember(Path(call["output_file"]), call["config_dir"], call.get("config_name", "config"),
                 list(call.get("overrides") or []))


_guard()
