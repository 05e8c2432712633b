"""Stage `train`: the student, trained with the strategy named by `strategy` in params.yaml."""

from pipeline.runs import train_run
from pipeline.utils import write_json
from stages._common import start


def main() -> None:
    cfg = start()
    summary = train_run(cfg, "student", "data/student/model.pt")
    write_json("data/student/history.json", summary["history"])


if __name__ == "__main__":
    main()
