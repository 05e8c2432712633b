"""Stage `survey_analysis` (survey/dvc.yaml): detection rates, false alarms, d′ and the plot from the exported
responses (`sipat survey export` writes data/survey/responses.csv)."""

from pipeline.errors import expected_errors
from pipeline.survey.analysis import analyse, read_responses, write_analysis
from pipeline.utils import setup_logging

RESPONSES = "data/survey/responses.csv"
OUT = "data/survey/analysis"


def main() -> None:
    setup_logging()
    with expected_errors():
        write_analysis(analyse(read_responses(RESPONSES)), OUT)


if __name__ == "__main__":
    main()
