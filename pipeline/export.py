"""Any registered dataset written in the `folder` layout: images by split and class, its human masks as a mask
folder, and the same masks as a COCO instances file (compressed RLE). The README's "Your own data" example
starts from the embedded digits exported this way."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core.utils import atomic_path
from pipeline.data import ImageDataset
from pipeline.data.folder import MASKS

COCO_FILE = "annotations.json"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def _own(path: Path) -> bool:
    """A folder this exporter wrote (it holds its COCO file and nothing but the layout's folders)."""
    return (path / COCO_FILE).is_file() and {p.name for p in path.iterdir()} <= {"train", "test", MASKS, COCO_FILE}


def export_folder(splits: dict[str, ImageDataset], out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Write `splits` ({"train": ds, "test": ds}) under `out` as PNGs at their stored size: `train/<class>/`,
    `test/<class>/`, `masks/` (0/255 PNGs, where the dataset has segmentations) and `annotations.json` (COCO,
    one instance per annotated image, category "salient"). Replaces `out` only if this function wrote it."""
    from pycocotools import mask as cmask

    out = Path(out)
    summary: dict[str, Any] = {"images": 0, "masks": 0}
    images, annotations = [], []
    with atomic_path(out, is_dir=True, owned=_own) as tmp:
        for split, ds in splits.items():
            classes = [_safe(c) for c in ds.class_names]
            has_masks = ds.has_segmentations
            for i in tqdm(range(len(ds)), desc=f"export {split}", unit="img", disable=not progress, leave=False):
                stem = _safe(Path(str(ds.ids[i]).split(":", 1)[-1]).stem)
                rel = f"{split}/{classes[int(ds.labels[i])]}/{stem}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                img = ds.image_uint8(i).permute(1, 2, 0).numpy()
                Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp / rel)
                image_id = len(images) + 1
                h, w = img.shape[:2]
                images.append({"id": image_id, "file_name": rel, "height": h, "width": w})
                summary["images"] += 1
                if not has_masks:
                    continue
                with Image.open(ds.segmentation_path(i)) as seg:
                    mask = np.asarray(seg.convert("L").resize((w, h), Image.NEAREST)) >= 128
                mask_path = tmp / MASKS / Path(rel)
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path)
                rle = cmask.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                                    "area": int(mask.sum()), "bbox": cmask.toBbox(rle).tolist(), "iscrowd": 0})
                summary["masks"] += 1
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "salient", "supercategory": "salient"}]}
        (tmp / COCO_FILE).write_text(json.dumps(coco))
    return summary
