"""Stage `prepare`: materialise an embedded data set (digits, cluttered digits: CUB trees) or check a real root.

    python -m stages.prepare --out data/prepared

Every image is decoded once (unreadable ones are named together), and the manifest records a content
fingerprint of every file the dataset reads: a DVC output, so that replaced data reruns every stage after it.
It runs first at every repro, so it also checks every stage's parameters (`pipeline.validate`).
"""

import argparse
import json
import logging
from pathlib import Path

from pipeline.core.errors import DatasetError, OutputConflict, expected_errors

log = logging.getLogger("stages.prepare")

MANIFEST = "manifest.json"


def is_prepared(path: Path) -> bool:
    """A folder this stage wrote: it holds a manifest with the keys written below."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(manifest, dict) and {"dataset", "content"} <= manifest.keys()):
        return False
    from pipeline.core.utils import foreign_entries
    from pipeline.data import DATASETS

    # besides the manifest, only an embedded data set's own folder is this stage's
    tree = {Path(spec.default_root).name for spec in (DATASETS.get(n) for n in DATASETS.names())
            if spec.embedded_writer is not None and spec.default_root}
    foreign = foreign_entries(path, lambda rel: rel == Path(MANIFEST) or rel.parts[0] in tree)
    if foreign:
        raise OutputConflict(f"{path} was written by this stage but also holds {', '.join(foreign[:3])}, which it "
                             f"did not write; move them out (replacing the folder would delete them)")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (the embedded data set and a manifest)")
    args = parser.parse_args()
    with expected_errors():  # imports inside: Ctrl-C while torch loads is one line too
        from pipeline.core.config import load_config
        from pipeline.core.utils import atomic_path, limit_threads, setup_logging, write_json
        from pipeline.data import DATASETS, content_fingerprint, load_dataset
        from pipeline.human_masks import mask_source
        from pipeline.validate import check_config, check_data

        setup_logging()
        limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
        cfg = load_config()
        check_config(cfg)  # every stage's parameters, before anything is trained
        with atomic_path(args.out, is_dir=True, owned=is_prepared) as tmp:
            summary = {"dataset": cfg.dataset}
            spec = DATASETS.get(cfg.dataset, "dataset")
            if spec.embedded_writer is not None:  # embedded data sets are written here, under --out
                tree = tmp / Path(spec.default_root).name
                summary.update(spec.embedded_writer(tree))
                root = str(tree)
            else:
                root = cfg.data.root
            splits = {s: load_dataset(cfg.dataset, root, s, cfg.data.image_size) for s in ("train", "test")}
            check_data(cfg, splits["train"])  # e.g. sip_h on a data set without segmentations
            if cfg.human_masks.coco is not None or hasattr(splits["train"], "annotation_problems"):
                # a broken COCO file or a mask without its image: named now, not after the teacher's training
                source = mask_source(splits["train"], root=root, coco=cfg.human_masks.coco)
                problems = source.problems() if source is not None else []
                if problems:
                    raise DatasetError(f"{len(problems)} mask problem(s): " + "; ".join(problems[:5]))
            unreadable = [msg for ds in splits.values() for msg in ds.unreadable_images()]
            if unreadable:
                shown = "; ".join(unreadable[:5]) + (f"; ... and {len(unreadable) - 5} more" if len(unreadable) > 5
                                                     else "")
                raise DatasetError(f"{len(unreadable)} image(s) cannot be decoded: {shown}")
            for name, ds in splits.items():
                summary[f"{name}_images"] = len(ds)
                summary[f"{name}_fingerprint"] = ds.fingerprint()
            summary["classes"] = splits["train"].num_classes
            summary["image_shape"] = list(splits["train"].image_shape)
            summary["has_segmentations"] = splits["train"].has_segmentations
            summary["content"] = content_fingerprint(list(splits.values()))
            write_json(tmp / MANIFEST, summary)
    log.info("prepared %s: %s", cfg.dataset, summary)


if __name__ == "__main__":
    main()
