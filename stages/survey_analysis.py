"""Stage `survey_analysis` (survey/dvc.yaml): detection rates, false alarms, d′ and the plot from the exported
responses (`sipat survey export` writes them).

    python -m stages.survey_analysis --responses data/survey/responses.csv --out data/survey/analysis
"""

import argparse

from pipeline.core.errors import expected_errors
from pipeline.core.utils import setup_logging
from pipeline.survey.analysis import analyse, read_responses, write_analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", required=True, help="responses CSV exported from the survey")
    parser.add_argument("--out", required=True, help="folder for detection.{json,csv,png}")
    args = parser.parse_args()
    setup_logging()
    with expected_errors():
        write_analysis(analyse(read_responses(args.responses)), args.out)


if __name__ == "__main__":
    main()
