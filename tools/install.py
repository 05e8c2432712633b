"""Install the project into a virtual environment: uv when it can be had, pip otherwise.

uv does not read pip's configuration, so the index, find-links, constraint and certificate settings that
``pip config list`` reports on this machine are passed to uv as flags: a machine that installs with pip
installs the same way with uv, and no machine's paths are written into the project.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# pip option -> uv flag; values may be space-separated lists in pip's configuration
_LIST_OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(python: str) -> dict[str, list[str]]:
    """pip's effective configuration (files and PIP_* variables) as option -> values."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False)
    settings: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, option = key.rpartition(".")
        if section.lstrip(":").split(":")[0] not in ("global", "install", "env", ""):
            continue
        value = value.strip().strip("'\"")
        # later sources (install over global, environment over files) win, as in pip
        settings[option] = value.split()
    return settings


def uv_flags(settings: dict[str, list[str]]) -> list[str]:
    flags: list[str] = []
    for option, flag in _LIST_OPTIONS.items():
        for value in settings.get(option, []):
            flags += [flag, value]
    if any(o in settings for o in ("extra-index-url", "find-links")):
        # pip picks the best version across all indexes; uv's default stops at the first index with the name
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


def uv_env(settings: dict[str, list[str]]) -> dict[str, str]:
    import os

    env = dict(os.environ)
    cert = settings.get("cert")
    if cert and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = cert[0]
    return env


def find_uv(venv_python: str) -> str | None:
    """uv on PATH, else uv installed into the environment with pip (a single wheel, a few seconds)."""
    found = shutil.which("uv")
    if found:
        return found
    bindir = Path(venv_python).parent
    if not (bindir / "uv").exists():
        r = subprocess.run([venv_python, "-m", "pip", "install", "-qq", "--disable-pip-version-check", "uv"],
                           check=False)
        if r.returncode != 0:
            return None
    return str(bindir / "uv") if (bindir / "uv").exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv")
    parser.add_argument("--spec", default="-e .[dev]", help="what to install, as pip arguments")
    parser.add_argument("--pip-only", action="store_true", help="do not try uv")
    args = parser.parse_args()

    venv = Path(args.venv)
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = shlex.split(args.spec)
    start = time.perf_counter()
    if not args.pip_only:
        settings = pip_settings(python)
        uv = find_uv(python)
        if uv:
            cmd = [uv, "pip", "install", "--quiet", "--python", python, *uv_flags(settings), *spec]
            if subprocess.run(cmd, env=uv_env(settings), check=False).returncode == 0:
                print(f"installed with uv in {time.perf_counter() - start:.0f} s")
                return 0
            print("uv failed; installing with pip instead", file=sys.stderr)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec], check=True)
    print(f"installed with pip in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
