"""Stage `survey_images_<version>`: the survey image set of one trained checkpoint, and its summary metrics."""

import argparse
from pathlib import Path

from pipeline.survey.images import build_from_checkpoint
from pipeline.utils import write_json
from stages._common import expected_errors, start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("version", help="survey version name, e.g. teacher")
    parser.add_argument("checkpoint", help="the attacked model, e.g. data/teacher/model.pt")
    args = parser.parse_args()
    cfg = start()
    with expected_errors():
        summary = build_from_checkpoint(cfg, args.checkpoint, args.version, Path("data/survey/images") / args.version)
        write_json(Path("data/metrics") / f"survey_{args.version}.json", summary)


if __name__ == "__main__":
    main()
