"""Stage `survey_images_<version>`: the survey image set of one trained checkpoint, and its summary metrics.

    python -m stages.survey_images teacher --checkpoint data/teacher/model.pt \
        --out data/survey/images/teacher --metrics data/metrics/survey_teacher.json
"""

import argparse

from pipeline.core.config import load_config
from pipeline.core.errors import expected_errors
from pipeline.core.utils import check_output, limit_threads, setup_logging, write_json
from pipeline.survey.images import build_from_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="survey version name, e.g. teacher")
    parser.add_argument("--checkpoint", required=True, help="the attacked model, e.g. data/teacher/model.pt")
    parser.add_argument("--out", required=True, help="image set folder to write")
    parser.add_argument("--metrics", required=True, help="summary metrics JSON to write")
    args = parser.parse_args()
    setup_logging()
    limit_threads()  # SIPAT_CPUS / SLURM_CPUS_PER_TASK, where set
    with expected_errors():
        check_output(args.metrics, kind="json")
        cfg = load_config()
        summary = build_from_checkpoint(cfg, args.checkpoint, args.version, args.out)
        write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
