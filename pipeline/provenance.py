"""What produced a published result, so that it cannot go stale silently: the commit, the processor, a digest of
every code file the stages read, and the parameter values they read.

A result folder (`results/<protocol>/`) holds the metrics files of a grid and a `provenance.json` written by
`sipat grid collect`; `freshness` compares it with a working tree and names what changed since.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

PROVENANCE = "provenance.json"


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip()}")
    return proc.stdout


def _ignored(path: str) -> bool:
    return "__pycache__" in path.split("/") or path.endswith((".pyc", ".pyo"))


def code_digests(repo: Path, paths: Iterable[str], rev: Optional[str] = None) -> dict[str, str]:
    """sha256 of every tracked file under `paths` (files or folders, relative to the repository), at `rev`, or
    in the working tree when `rev` is None. Bytecode caches are not code."""
    paths = sorted(set(paths))
    if not paths:
        return {}
    out: dict[str, str] = {}
    if rev is None:
        for name in _git(repo, "ls-files", "-z", "--", *paths).split("\0"):
            if name and not _ignored(name) and (repo / name).is_file():
                out[name] = hashlib.sha256((repo / name).read_bytes()).hexdigest()
        return dict(sorted(out.items()))
    for line in _git(repo, "ls-tree", "-r", "-z", rev, "--", *paths).split("\0"):
        if not line:
            continue
        meta, name = line.split("\t", 1)
        if _ignored(name):
            continue
        blob = subprocess.run(["git", "cat-file", "blob", meta.split()[2]], cwd=repo, capture_output=True,
                              check=True).stdout
        out[name] = hashlib.sha256(blob).hexdigest()
    return dict(sorted(out.items()))


def fingerprint(digests: dict[str, str], params: dict[str, Any]) -> str:
    """One short digest of the code and the parameters together."""
    import json

    text = json.dumps({"code": digests, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def processor() -> str:
    """The processor's model name (`lscpu`'s 'Model name'), as timings must be read against it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def pick(params: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The values of dotted keys (`train`, `data.root`, ...) in a nested parameter dict; absent keys are None."""
    out = {}
    for key in sorted(set(keys)):
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def changes(recorded: dict[str, Any], current_code: dict[str, str], current_params: dict[str, Any]) -> list[str]:
    """What differs between a result's provenance and now: code files (changed, added, removed) and parameter
    keys (dotted, with old and new values); empty when nothing the stages read has changed."""
    out = []
    old_code = recorded.get("code") or {}
    for name in sorted(old_code.keys() | current_code.keys()):
        if name not in current_code:
            out.append(f"{name} (removed)")
        elif name not in old_code:
            out.append(f"{name} (added)")
        elif old_code[name] != current_code[name]:
            out.append(name)
    old_p, new_p = _flatten("", recorded.get("params") or {}), _flatten("", current_params)
    for key in sorted(old_p.keys() | new_p.keys()):
        if old_p.get(key) != new_p.get(key):
            out.append(f"{key}: {old_p.get(key)!r} → {new_p.get(key)!r}")
    return out
