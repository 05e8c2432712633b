"""Stage `train`: the student with `strategy` from params (or, by hand, the teacher: see stages/teacher.py).

    python -m stages.train student --out data/student/model.pt --history data/student/history.json \
        --plot data/student/history.png \
        --masks synthetic=data/masks/synthetic.zarr --masks human=data/masks/human.zarr

Runs under `torchrun` too (DistributedDataParallel; only rank 0 writes).
"""

import argparse
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging, write_json
from pipeline.distributed import is_main
from pipeline.maskstore import parse_store_args, store_digest
from pipeline.strategies import builtin  # noqa: F401  (the student may run any strategy)
from pipeline.training.curves import plot_history
from pipeline.training.run import train_run


def _masks(items: list[str], record: str | None) -> dict[str, str]:
    stores = parse_store_args(items)
    if record is not None:  # the student_masks stage's record: the one store this strategy reads
        import json

        rec = json.loads(Path(record).read_text())
        if rec.get("kind") is not None:
            if store_digest(rec["store"]) != rec.get("digest"):
                raise ConfigError(f"mask store {rec['store']} changed since {record} was written: run `dvc repro` "
                                  f"(the student_masks stage records the store the student reads)")
            stores[rec["kind"]] = rec["store"]
    return stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("teacher", "student"))
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--history", required=True, help="per-epoch validation curves (JSON) to write")
    parser.add_argument("--plot", help="the same curves as a PNG to write (opens with no network)")
    parser.add_argument("--masks", action="append", default=[], metavar="KIND=PATH",
                        help="mask store of each kind a strategy may read (synthetic, human)")
    parser.add_argument("--masks-from", metavar="JSON", help="the student_masks stage's record of the one store "
                        "the strategy reads (what dvc.yaml passes)")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        check_output(args.out, kind="torch")  # before hours of training, not after
        check_output(args.history, kind="json")
        if args.plot:
            check_output(args.plot, kind="png")
        cfg = load_config()
        summary = train_run(cfg, args.role, args.out, mask_stores=_masks(args.masks, args.masks_from))
    if is_main():  # under torchrun only rank 0 writes
        write_json(args.history, {"history": summary["history"]})
        if args.plot:
            what = (f"teacher: madry, {cfg.teacher.model}" if args.role == "teacher"
                    else f"student: {cfg.strategy}, {cfg.model}")
            plot_history(summary["history"], args.plot, title=f"{what} on {cfg.dataset}",
                         selected_epoch=summary.get("selected_epoch"), select=summary.get("select"))


if __name__ == "__main__":
    main()
