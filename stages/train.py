"""Stage `train`: the student, trained with the strategy named by `strategy` in params.yaml."""

from pipeline.distributed import is_main
from pipeline.runs import train_run
from pipeline.utils import write_json
from stages._common import expected_errors, start


def main() -> None:
    cfg = start()
    with expected_errors():
        summary = train_run(cfg, "student", "data/student/model.pt")
    if is_main():  # under torchrun only rank 0 writes
        write_json("data/student/history.json", summary["history"])


if __name__ == "__main__":
    main()
