"""Stages `evaluate_teacher` / `evaluate`: AutoAttack at every budget of `evaluate.eps`, as metrics JSON."""

import argparse
from pathlib import Path

from pipeline.runs import evaluate_run
from stages._common import expected_errors, start

TARGETS = {"teacher": "data/teacher/model.pt", "student": "data/student/model.pt"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=sorted(TARGETS))
    args = parser.parse_args()
    cfg = start()
    out = Path(f"data/metrics/{args.which}.json")
    eps = cfg.evaluate.teacher_eps if args.which == "teacher" else None
    with expected_errors():
        evaluate_run(cfg, TARGETS[args.which], out, partial_path=out.parent / f".{args.which}.partial.json",
                     eps=eps)


if __name__ == "__main__":
    main()
