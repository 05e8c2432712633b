"""Stage `student_masks`: which mask store the student's strategy reads, recorded with that store's digest.

    python -m stages.student_masks --masks synthetic=data/masks/synthetic.zarr \
        --masks human=data/masks/human.zarr --out data/masks/student.json

The train stage depends on this small record instead of on every store: a SIP-S student is not retrained when
the human masks change (nor a basic or Madry one when either does), while a change of the store its strategy
reads changes the record's digest and retrains it.
"""

import argparse

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging, write_json
from pipeline.maskstore import parse_store_args, store_digest
from pipeline.strategies import STRATEGIES, builtin  # noqa: F401  (every strategy's mask kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", action="append", default=[], metavar="KIND=PATH",
                        help="mask store of each kind a strategy may read (synthetic, human)")
    parser.add_argument("--out", required=True, help="the record to write (JSON)")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        check_output(args.out, kind="json")
        stores = parse_store_args(args.masks)
        cfg = load_config()
        kind = STRATEGIES.get(cfg.strategy, "strategy").mask_kind
        record = {"strategy": cfg.strategy, "kind": kind}
        if kind is not None:
            if kind not in stores:
                raise ConfigError(f"strategy {cfg.strategy!r} reads {kind} masks, but no --masks {kind}=PATH was given")
            record.update(store=stores[kind], digest=store_digest(stores[kind]))
        write_json(args.out, record)


if __name__ == "__main__":
    main()
