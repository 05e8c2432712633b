"""The on-disk format of a survey image set (no torch needed: the web app reads sets with this alone).

A set is a folder with `images/*.png`, `manifest.csv` (one row per image, columns `MANIFEST_FIELDS`) and
`set.json` (provenance, attack, the two example pairs and the summary metrics).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import DatasetError

FORMAT = "sipat-survey-images-v2"  # v2: grey images keep equal channels (`constraint`)
MANIFEST = "manifest.csv"
META = "set.json"
MANIFEST_FIELDS = ("file", "version", "role", "index", "image_id", "label", "class_name", "eps_255", "eps",
                   "linf_255", "mean_abs_255", "clean_pred", "pred", "clean_correct", "adversarial_float",
                   "still_adversarial", "attack", "constraint")


def read_image_set(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """`set.json` and the manifest rows of an image set (as written by `build_image_set`)."""
    folder = Path(folder)
    meta_path, man_path = folder / META, folder / MANIFEST
    if not meta_path.is_file() or not man_path.is_file():
        raise DatasetError(f"{folder} is not a survey image set (needs {META} and {MANIFEST}; build one with "
                           f"`sipat survey images` or `dvc repro`)")
    try:
        info = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{meta_path}: not valid JSON: {err}") from None
    if info.get("format") != FORMAT:
        raise DatasetError(f"{meta_path}: unknown format {info.get('format')!r} (expected {FORMAT}); rebuild the "
                           f"set with `dvc repro` or `sipat survey images`")
    with open(man_path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(MANIFEST_FIELDS) - set(rows[0] if rows else MANIFEST_FIELDS)
    if missing:
        raise DatasetError(f"{man_path}: missing column(s) {sorted(missing)}")
    return info, rows
