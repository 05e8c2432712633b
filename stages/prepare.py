"""Stage `prepare`: materialise the embedded default (digits as a CUB tree) or check a real dataset's root.

    python -m stages.prepare --out data/prepared
"""

import argparse
import logging

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import atomic_path, setup_logging, write_json
from pipeline.data import load_dataset
from pipeline.data.digits import write_digits_cub

log = logging.getLogger("stages.prepare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (the embedded data set and a manifest)")
    args = parser.parse_args()
    setup_logging()
    with expected_errors():
        cfg = load_config()
        with atomic_path(args.out, is_dir=True) as tmp:
            summary = {"dataset": cfg.dataset}
            if cfg.dataset == "digits":
                summary.update(write_digits_cub(tmp / "digits_cub"))
                root = str(tmp / "digits_cub")
            else:
                root = cfg.data.root
            splits = {s: load_dataset(cfg.dataset, root, s, cfg.data.image_size) for s in ("train", "test")}
            for name, ds in splits.items():
                summary[f"{name}_images"] = len(ds)
                summary[f"{name}_fingerprint"] = ds.fingerprint()
            summary["classes"] = splits["train"].num_classes
            summary["image_shape"] = list(splits["train"].image_shape)
            summary["has_segmentations"] = splits["train"].has_segmentations
            write_json(tmp / "manifest.json", summary)
    log.info("prepared %s: %s", cfg.dataset, summary)


if __name__ == "__main__":
    main()
