"""Stage `masks_synthetic`: eq. 7–8 masks of the training split from the robust teacher.

    python -m stages.masks_synthetic --teacher data/teacher/model.pt --out data/masks/synthetic.zarr

Runs as one process or split over several (`torchrun --nproc-per-node N -m stages.masks_synthetic ...`);
the store is the same either way.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging
from pipeline.data import load_dataset
from pipeline.distributed import is_main
from pipeline.maskstore import packed_width
from pipeline.synthetic_masks import extract_synthetic

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="robust teacher checkpoint")
    parser.add_argument("--out", required=True, help="mask store to write")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        cfg = load_config()
        dataset = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
        # a user's folder, a read-only one or too little space for the uncompressed masks: refused now
        check_output(args.out, is_dir=True, min_free=len(dataset) * packed_width(dataset.image_shape))
        attrs = extract_synthetic(args.teacher, dataset, args.out, root=cfg.data.root,
                                  fraction=cfg.salience.fraction, target=cfg.salience.target,
                                  batch_size=cfg.salience.batch_size, chunk_size=cfg.salience.chunk_size,
                                  device=cfg.device, num_workers=cfg.data.num_workers)
    if not is_main():  # every process holds the same attributes; one summary is enough
        return
    cov = attrs["coverage"]
    log.info("%s: %d masks, salient fraction mean %.3f (median %.3f), %d all-zero gradients", args.out, attrs["n"],
             cov.get("mean", 0.0), cov.get("p50", 0.0), attrs.get("counts", {}).get("zero_gradient", 0))


if __name__ == "__main__":
    main()
