"""Human masks from a COCO instances file: per image, the union of its instance masks (polygons or RLE, decoded
with pycocotools), or of the instances of named categories.

An image is matched by ``file_name``: its path relative to the data root (``train/cat/a.jpg``), or, for a bare
file name, the one image of that name. The file's problems (an annotation of an unknown image id, an image
that matches no file under the root, a malformed segmentation, an unknown category) are named all at once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.data import DatasetError, ImageDataset

SHOWN = 10


def _rle(seg: Any, h: int, w: int) -> dict:
    """One annotation's segmentation as a compressed RLE of h×w (ValueError when malformed)."""
    from pycocotools import mask as cmask

    if isinstance(seg, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        if not seg or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2
                          or not all(isinstance(v, (int, float)) for v in p) for p in seg):
            raise ValueError("polygons must be lists of at least 3 x, y pairs")
        return cmask.merge(cmask.frPyObjects(seg, h, w))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"RLE size {list(seg['size'])} is not the image's [height, width] [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts must be non-negative and sum to {h}×{w}")
            return cmask.frPyObjects(seg, h, w)
        if isinstance(counts, str):
            return {"size": [h, w], "counts": counts.encode("ascii")}
    raise ValueError("segmentation is neither polygons nor an RLE ({'size': [h, w], 'counts': ...})")


class CocoMasks:
    """The masks of `dataset`'s images from the COCO file at `path` (checked when made)."""

    def __init__(self, dataset: ImageDataset, path: Path, categories: Sequence[str] = ()):
        self.dataset, self.path, self.categories = dataset, Path(path), list(categories)
        relpaths = getattr(dataset, "all_relpaths", None)
        if relpaths is None:
            raise DatasetError(f"{path}: COCO masks need a dataset whose images are files under its root (the "
                               f"`folder` dataset); {dataset.name!r} is not one")
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"COCO file not found: {self.path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"{self.path}: not a readable JSON file ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
                or not isinstance(doc.get("annotations"), list):
            raise DatasetError(f"{self.path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
        problems: list[str] = []

        cats = {c.get("id"): c.get("name") for c in doc.get("categories") or [] if isinstance(c, dict)}
        unknown = [c for c in self.categories if c not in cats.values()]
        if unknown:
            problems.append(f"human_masks.coco.categories: {', '.join(map(repr, unknown))} not among the file's "
                            f"categories ({', '.join(sorted(map(str, cats.values()))) or 'none'})")
        wanted = {k for k, v in cats.items() if v in self.categories} if self.categories else None

        exact = set(relpaths)
        by_name: dict[str, list[str]] = defaultdict(list)
        for rel in relpaths:
            by_name[PurePosixPath(rel).name].append(rel)
        mine = {rel: i for i, rel in enumerate(getattr(dataset, "relpaths"))}
        images: dict[Any, tuple[str, int, int]] = {}  # COCO image id -> (relative path, height, width)
        taken: dict[str, Any] = {}
        for k, im in enumerate(doc["images"]):
            if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= im.keys():
                problems.append(f"images[{k}]: needs id, file_name, height and width")
                continue
            name = PurePosixPath(str(im["file_name"]))
            if name.is_absolute() or ".." in name.parts:
                problems.append(f"image id {im['id']}: file_name {str(name)!r} leads outside the data root")
                continue
            rel = name.as_posix() if name.as_posix() in exact else (
                by_name[name.name][0] if len(name.parts) == 1 and len(by_name.get(name.name, ())) == 1 else None)
            if rel is None:
                twice = len(by_name.get(name.name, ())) > 1 and len(name.parts) == 1
                problems.append(f"image id {im['id']}: file_name {str(name)!r} " + (
                    f"is the name of {len(by_name[name.name])} images; give its path relative to the data root"
                    if twice else f"matches no image under {getattr(dataset, 'root', 'the data root')}"))
                continue
            if im["id"] in images:
                problems.append(f"image id {im['id']} given twice")
                continue
            if rel in taken:
                problems.append(f"image ids {taken[rel]} and {im['id']} are the same image {rel!r}")
                continue
            taken[rel] = im["id"]
            images[im["id"]] = (rel, int(im["height"]), int(im["width"]))

        self.segments: dict[int, list[dict]] = defaultdict(list)  # dataset index -> RLEs
        self.sizes: dict[int, tuple[int, int]] = {}  # dataset index -> (width, height) the file states
        for k, ann in enumerate(doc["annotations"]):
            aid = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            if not isinstance(ann, dict) or "image_id" not in ann or "segmentation" not in ann:
                problems.append(f"annotation {aid}: needs image_id and segmentation")
                continue
            if ann["image_id"] not in images:
                problems.append(f"annotation {aid}: image_id {ann['image_id']} is not an image of the file")
                continue
            if cats and ann.get("category_id") not in cats:
                problems.append(f"annotation {aid}: category_id {ann.get('category_id')} is not a category of the "
                                f"file")
                continue
            if wanted is not None and ann.get("category_id") not in wanted:
                continue
            rel, h, w = images[ann["image_id"]]
            try:
                rle = _rle(ann["segmentation"], h, w)
            except (ValueError, TypeError) as err:
                problems.append(f"annotation {aid}: {err}")
                continue
            if rel in mine:  # the other split's annotations are checked, not kept
                self.segments[mine[rel]].append(rle)
                self.sizes[mine[rel]] = (w, h)
        if problems:
            more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
            raise DatasetError(f"{self.path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:SHOWN])
                               + more)

    rule = ("COCO instances of the image (polygons or RLE, pycocotools), their union, resized nearest-neighbour to "
            "image_size², salient where value / 255 >= threshold; one channel broadcast over C")

    def provenance(self) -> dict[str, Any]:
        from pipeline.core.utils import sha256_file

        return {"coco": str(self.path), "sha256": sha256_file(self.path), "categories": self.categories or "all"}

    def problems(self) -> list[str]:
        return []  # the file's problems are raised when it is read

    def name(self, i: int) -> str:
        return f"{self.path} ({self.dataset.relpaths[i]})"

    def absent(self) -> list[str]:
        """The images of the dataset without an annotation (of the chosen categories)."""
        return [str(self.dataset.image_paths[i]) for i in range(len(self.dataset)) if i not in self.segments]

    def read(self, i: int) -> torch.Tensor:
        """The union of image `i`'s instance masks, 0/255 uint8 1×S×S (nearest-neighbour)."""
        from pycocotools import mask as cmask

        if i not in self.segments:
            raise FileNotFoundError(f"no annotation for {self.dataset.image_paths[i]}")
        want = self.dataset.original_size(i)
        if self.sizes[i] != want:
            raise DatasetError(f"{self.path}: {self.dataset.relpaths[i]} is {want[0]}×{want[1]}, the file says "
                               f"{self.sizes[i][0]}×{self.sizes[i][1]}: its masks would not fit the image")
        union = cmask.decode(self.segments[i]).max(axis=2)  # H×W×instances
        size = self.dataset.image_size
        img = Image.fromarray((union > 0).astype(np.uint8) * 255, mode="L").resize((size, size), Image.NEAREST)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())[None]
