"""Stage `teacher`: Madry PGD-AT of the robust teacher, the source of the synthetic masks; or, with
`teacher.checkpoint` set, the user's robust checkpoint, checked and written in this project's format.

    python -m stages.teacher --out data/teacher/model.pt --history data/teacher/history.json \
        --plot data/teacher/history.png

It imports the `madry` strategy only (not stages/train.py, which imports every strategy), so that an edit of
another strategy does not retrain the teacher. Runs under `torchrun` too (only rank 0 writes).
"""

import argparse

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging, write_json
from pipeline.distributed import is_main
from pipeline.strategies import madry  # noqa: F401  (the teacher's strategy)
from pipeline.training.curves import plot_history
from pipeline.training.run import import_teacher, train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--history", required=True, help="per-epoch validation curves (JSON) to write")
    parser.add_argument("--plot", help="the same curves as a PNG to write (optional)")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        check_output(args.out, kind="torch")  # before hours of training, not after
        check_output(args.history, kind="json")
        if args.plot:
            check_output(args.plot, kind="png")
        cfg = load_config()
        if cfg.teacher.checkpoint is not None:  # the user's robust checkpoint instead of training one
            summary = import_teacher(cfg, args.out) if is_main() else {}
            title = f"teacher: imported from {cfg.teacher.checkpoint} (not trained here)"
        else:
            summary = train_run(cfg, "teacher", args.out)
            title = f"teacher: madry, {cfg.teacher.model} on {cfg.dataset}"
    if is_main():  # under torchrun only rank 0 writes
        write_json(args.history, {"history": summary["history"],
                                  **({"imported_from": summary["imported_from"]} if "imported_from" in summary else {})})
        if args.plot:
            plot_history(summary["history"], args.plot, title=title,
                         selected_epoch=summary.get("selected_epoch"), select=summary.get("select"))


if __name__ == "__main__":
    main()
