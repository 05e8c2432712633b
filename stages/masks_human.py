"""Stage `masks_human`: masks of the training split from human annotations (mask files or a COCO file).

    python -m stages.masks_human --out data/masks/human.zarr

A dataset without segmentations (CIFAR) still gets a store, one that holds no masks and says why, so that the
pipeline runs and a later `sip_h` run refuses it with that reason.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging
from pipeline.data import load_dataset
from pipeline.human_masks import extract_human, write_no_human_masks
from pipeline.maskstore import packed_width

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="mask store to write")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        cfg = load_config()
        dataset = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
        # a user's folder, a read-only one or too little space for the uncompressed masks: refused now
        check_output(args.out, is_dir=True, min_free=len(dataset) * packed_width(dataset.image_shape))
        if not dataset.has_segmentations and cfg.human_masks.coco is None:
            write_no_human_masks(dataset, args.out, root=cfg.data.root)
            return
        attrs = extract_human(dataset, args.out, root=cfg.data.root, threshold=cfg.human_masks.threshold,
                              missing=cfg.human_masks.missing, chunk_size=cfg.salience.chunk_size,
                              batch_size=cfg.salience.batch_size, coco=cfg.human_masks.coco)
    log.info("%s: %d masks, salient fraction mean %.3f, counts %s", args.out, attrs["n"],
             attrs["coverage"].get("mean", 0.0), attrs.get("counts", {}))


if __name__ == "__main__":
    main()
