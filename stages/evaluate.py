"""Stages `evaluate_teacher` / `evaluate`: clean accuracy and AutoAttack at every budget, as metrics JSON.

    python -m stages.evaluate student --checkpoint data/student/model.pt --out data/metrics/student.json

The teacher is evaluated at `evaluate.teacher_eps` (null: every budget of `evaluate.eps`).
"""

import argparse
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import setup_logging
from pipeline.evaluation.run import evaluate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("teacher", "student"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args()
    setup_logging()
    out = Path(args.out)
    with expected_errors():
        cfg = load_config()
        eps = cfg.evaluate.teacher_eps if args.role == "teacher" else None
        evaluate_run(cfg, args.checkpoint, out, partial_path=out.parent / f".{out.stem}.partial.json", eps=eps)


if __name__ == "__main__":
    main()
