"""Stages `evaluate_teacher` / `evaluate`: clean accuracy and AutoAttack at every budget, as metrics JSON.

    python -m stages.evaluate student --checkpoint data/student/model.pt --out data/metrics/student.json

The teacher is evaluated at `evaluate.teacher_eps`, the student at `evaluate.eps`. The points are
attacked in chunks by `evaluate.workers` local processes, or by every rank of a torchrun job (one per GPU):

    torchrun --nproc_per_node 4 -m stages.evaluate student --checkpoint ... --out ...

Results are the same for any number of workers. Finished chunks are kept in `.<out>.partial.json` beside the
output until it is written, so a rerun after an interruption resumes there.
"""

import argparse
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging
from pipeline.evaluation.run import evaluate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("teacher", "student"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    out = Path(args.out)
    with expected_errors():
        check_output(out, kind="json")  # before the attacks, not after
        cfg = load_config()
        eps = cfg.evaluate.teacher_eps if args.role == "teacher" else None
        evaluate_run(cfg, args.checkpoint, out, partial_path=out.parent / f".{out.stem}.partial.json", eps=eps)


if __name__ == "__main__":
    main()
