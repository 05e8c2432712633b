"""`make repro` on a fresh clone, timed as a whole and stage by stage.

Clones the repository's committed HEAD (`--rev`) into a temporary folder, then runs there exactly what a
newcomer runs: `make install` (timed on its own), then `make repro` with its output read line by line; every
`Running stage 'NAME'` line DVC prints starts that stage's clock, so the stage times come from the one
`dvc repro` run that `make repro` makes. Prints a Markdown table (processor, load average, wall and CPU seconds
of every step) ready for docs/benchmarks.md; `--log` keeps the whole output, `--json` the figures.

    python benchmarks/repro_stage_times.py                 # clone of this repository's HEAD
    python benchmarks/repro_stage_times.py --keep --log repro.log --json repro_times.json

Run it on a quiet machine: every figure is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TextIO

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _fmt(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Optional[TextIO]) -> dict[str, Any]:
    """Run `cmd`, echoing its output to `log`; returns wall and CPU seconds and, per DVC stage, the wall seconds
    from its `Running stage` line to the next one (the last: to the end of `dvc repro`'s stage output)."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    marks: list[tuple[str, float]] = []
    end_of_stages: Optional[float] = None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        if log is not None:
            log.write(line)
            log.flush()
        m = STAGE_LINE.match(line)
        if m:
            marks.append((m.group(1), now))
        elif marks and line.startswith("Use `dvc push`"):
            end_of_stages = now  # DVC's last line after its last stage; `sipat metrics` follows
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {rc} (see --log)")
    ends = [t for _, t in marks[1:]] + [end_of_stages if end_of_stages is not None else wall]
    stages = {name: round(end - start, 1) for (name, start), end in zip(marks, ends)}
    return {"wall_s": round(wall, 1), "cpu_s": round(_children_cpu() - cpu0, 1), "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this one)")
    p.add_argument("--rev", default="HEAD", help="commit to check out in the clone")
    p.add_argument("--workdir", type=Path, default=None, help="where to clone (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the clone (default: removed at the end)")
    p.add_argument("--log", type=Path, help="write the whole output of install and repro here")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    parent = Path(tempfile.mkdtemp(prefix="sipat-repro-", dir=args.workdir))
    clone = parent / "fresh"
    # the clone's own .venv must come first; nothing of the caller's environment may leak into it
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if os.environ.get("VIRTUAL_ENV"):
        venv_bin = str(Path(os.environ["VIRTUAL_ENV"]) / "bin")
        env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d != venv_bin)
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    log = open(args.log, "w") if args.log else None
    try:
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", args.rev], cwd=clone, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True, text=True,
                                capture_output=True).stdout.strip()
        load0 = os.getloadavg()
        install = run_timed(["make", "install"], clone, env, log)
        repro = run_timed(["make", "repro"], clone, env, log)
        load1 = os.getloadavg()
    finally:
        if log is not None:
            log.close()
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)

    total_wall = install["wall_s"] + repro["wall_s"]
    staged = sum(repro["stages"].values())
    result = {"commit": commit, "processor": _processor(), "cores": os.cpu_count(), "python": sys.version.split()[0],
              "load_average_start": [round(v, 2) for v in load0], "load_average_end": [round(v, 2) for v in load1],
              "install": install, "repro": repro, "total_wall_s": round(total_wall, 1),
              "total_cpu_s": round(install["cpu_s"] + repro["cpu_s"], 1)}
    print(f"\n`make install` + `make repro` on a fresh clone of {commit}: {result['processor']}, {result['cores']} "
          f"cores, load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end\n")
    print("| step | wall |")
    print("|---|---|")
    print(f"| make install | {_fmt(install['wall_s'])} |")
    for name, secs in repro["stages"].items():
        print(f"| {name} | {_fmt(secs)} |")
    print(f"| rest of make repro (DVC start-up, lock file, `sipat metrics`) | {_fmt(repro['wall_s'] - staged)} |")
    print(f"| **total** | **{_fmt(total_wall)}** (CPU {_fmt(result['total_cpu_s'])}) |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"\nclone kept in {clone}")


if __name__ == "__main__":
    main()
