"""Stage `teacher`: Madry PGD adversarial training of the robust teacher (the source of synthetic masks)."""

from pipeline.runs import train_run
from pipeline.utils import write_json
from stages._common import start


def main() -> None:
    cfg = start()
    summary = train_run(cfg, "teacher", "data/teacher/model.pt")
    write_json("data/teacher/history.json", summary["history"])


if __name__ == "__main__":
    main()
