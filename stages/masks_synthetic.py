"""DVC stage `masks_synthetic`: eq. 7–8 masks of the training split from the robust teacher.

Runs as one process (`python -m stages.masks_synthetic`) or split over several
(`torchrun --nproc-per-node N -m stages.masks_synthetic`); the store is the same either way.
"""

from __future__ import annotations

import logging
import sys

from pipeline.data import DatasetError, load_dataset
from pipeline.distributed import is_main
from pipeline.maskstore import MaskStoreError
from pipeline.salience import extract_synthetic
from stages._common import start

TEACHER = "data/teacher/model.pt"
OUT = "data/masks/synthetic.zarr"

log = logging.getLogger(__name__)


def main() -> None:
    cfg = start()
    try:
        dataset = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
        attrs = extract_synthetic(TEACHER, dataset, OUT, root=cfg.data.root, fraction=cfg.salience.fraction,
                                  target=cfg.salience.target, batch_size=cfg.salience.batch_size,
                                  chunk_size=cfg.salience.chunk_size, device=cfg.device,
                                  num_workers=cfg.data.num_workers)
    except (DatasetError, MaskStoreError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if not is_main():  # every process holds the same attributes; one summary is enough
        return
    cov = attrs["coverage"]
    log.info("%s: %d masks, salient fraction mean %.3f (median %.3f), %d all-zero gradients", OUT, attrs["n"],
             cov.get("mean", 0.0), cov.get("p50", 0.0), attrs.get("counts", {}).get("zero_gradient", 0))


if __name__ == "__main__":
    main()
