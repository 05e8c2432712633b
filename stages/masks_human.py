"""DVC stage `masks_human`: masks of the training split from human segmentations (CUB layout).

A dataset without segmentations (CIFAR) still gets a store, one that holds no masks and says why, so that the
pipeline runs and a later `sip_h` run refuses it with that reason.
"""

from __future__ import annotations

import logging
import sys

from pipeline.data import DatasetError, load_dataset
from pipeline.maskstore import MaskStoreError
from pipeline.salience import extract_human, write_no_human_masks
from stages._common import start

OUT = "data/masks/human.zarr"

log = logging.getLogger(__name__)


def main() -> None:
    cfg = start()
    try:
        dataset = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
        if not dataset.has_segmentations:
            write_no_human_masks(dataset, OUT, root=cfg.data.root)
            return
        attrs = extract_human(dataset, OUT, root=cfg.data.root, threshold=cfg.human_masks.threshold,
                              missing=cfg.human_masks.missing, chunk_size=cfg.salience.chunk_size,
                              batch_size=cfg.salience.batch_size)
    except (DatasetError, MaskStoreError, ValueError) as err:
        sys.exit(f"error: {err}")
    log.info("%s: %d masks, salient fraction mean %.3f, counts %s", OUT, attrs["n"],
             attrs["coverage"].get("mean", 0.0), attrs.get("counts", {}))


if __name__ == "__main__":
    main()
