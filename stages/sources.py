"""Stage `sources`: the content of the files parameters name, so that a replaced file reruns what reads it (DVC
cannot depend on a file a parameter names; the path alone is a parameter).

    python -m stages.sources --teacher data/sources/teacher.json --annotations data/sources/annotations.json

`teacher.checkpoint` (read by the teacher stage) and `human_masks.coco.file` (read by masks_human). Runs at every
repro and rewrites the same bytes while the files are unchanged; a parameter set to null is recorded as such.
"""

import argparse
from pathlib import Path
from typing import Optional

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, expected_errors
from pipeline.core.utils import inside, sha256_file, write_json


def _record(key: str, path: Optional[Path]) -> dict:
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (name a file, or set {key} to null)")
    return {"key": key, "path": str(path) if path else None, "sha256": sha256_file(path) if path else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="JSON to write: the teacher checkpoint's digest")
    parser.add_argument("--annotations", required=True, help="JSON to write: the COCO file's digest")
    args = parser.parse_args()
    with expected_errors():
        cfg = load_config()
        teacher = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else None
        coco = cfg.human_masks.coco
        annotations = None
        if coco is not None:
            if cfg.data.root is None:
                raise ConfigError("human_masks.coco: needs data.root (the COCO file's path is relative to it)")
            annotations = inside(cfg.data.root, coco.file, "human_masks.coco.file")
        records = (_record("teacher.checkpoint", teacher), _record("human_masks.coco.file", annotations))
        for out, record in zip((args.teacher, args.annotations), records):
            write_json(out, record)


if __name__ == "__main__":
    main()
