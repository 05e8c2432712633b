"""Stage `prepare`: materialise an embedded data set (digits, cluttered digits: CUB trees) or check a real root.

    python -m stages.prepare --out data/prepared
"""

import argparse
import logging
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import atomic_path, setup_logging, write_json
from pipeline.data import DATASETS, load_dataset

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
            spec = DATASETS.get(cfg.dataset, "dataset")
            if spec.embedded_writer is not None:  # embedded data sets are written here, under --out
                tree = tmp / Path(spec.default_root).name
                summary.update(spec.embedded_writer(tree))
                root = str(tree)
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
