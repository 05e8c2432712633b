"""`sipat survey ...`: build image sets, serve the survey, export the answers, analyse them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

survey_app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True,
                         help="Human attack-detection survey (paper §4.5): build [green]images[/green], "
                              "[green]serve[/green] the survey, [green]export[/green] and [green]analyze[/green] "
                              "the answers.")
console = Console()

DEFAULT_DB = "data/survey/responses.sqlite"
DEFAULT_IMAGES = Path("data/survey/images")
DEFAULT_RESPONSES = Path("data/survey/responses.csv")


def _errors():
    from pipeline.cli import _errors as errors  # the CLI's one-line handler for expected failures

    return errors()


def _params(params: Path):
    from pipeline.core.config import SurveyConfig, load_config

    return load_config(params).survey if params.exists() else SurveyConfig()


@survey_app.command("images")
def images(
    checkpoint: Annotated[Path, typer.Option(help="the attacked model")],
    version: Annotated[str, typer.Option(help="survey version name (one per attacked model)")],
    out: Annotated[Optional[Path], typer.Option(help="folder to write [dim](default: data/survey/images/VERSION)"
                                                     "[/dim]")] = None,
    params: Annotated[Path, typer.Option(help="dataset, image size and the survey section")] = Path("params.yaml"),
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """The image set of one survey version: pool images at every budget as 8-bit PNGs, manifest and summary."""
    from pipeline.core.config import format_budget, load_config
    from pipeline.survey.images import build_from_checkpoint

    with _errors():
        cfg = load_config(params)
        out = out or DEFAULT_IMAGES / version
        summary = build_from_checkpoint(cfg, checkpoint, version, out, device=device, progress=not quiet)
    table = Table(title=f"{escape(str(out))}: {summary['n_pool']} pool images, attack {summary['attack']}",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for h in ("ε", "misclassified", "fooled*", "lost in rounding", "max L∞", "mean |δ|"):
        table.add_column(h, justify="right")
    table.caption = "* among the images the model classifies correctly when clean"
    for key, e in summary["per_eps"].items():
        k = int(key.split("_")[1])
        table.add_row(format_budget(k / 255), f"{e['misclassified']:.0%}", f"{e['fooled']:.0%}",
                      str(e["lost_by_rounding"]), f"{e['linf_255_max']}/255", f"{e['mean_abs_255']:.2f}/255")
    console.print(table)
    console.print("every image inside its ε-ball after 8-bit rounding: "
                  + ("[green]yes[/green]" if summary["all_inside_ball"] else "[red]NO[/red]"))


@survey_app.command("serve")
def serve(
    images_dir: Annotated[Path, typer.Option("--images", help="folder of image sets (one subfolder per version)")]
    = DEFAULT_IMAGES,
    db: Annotated[str, typer.Option(help="SQLite file, or any SQLAlchemy URL (e.g. postgresql+psycopg://...)")]
    = DEFAULT_DB,
    versions: Annotated[Optional[str], typer.Option(help="comma-separated versions to serve [dim](default: every "
                                                         "set found)[/dim]")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0: any free port")] = 8000,
    root_path: Annotated[str, typer.Option(help="URL prefix when served behind a proxy under a sub-path")] = "",
    title: Annotated[str, typer.Option(help="page title")] = "Image survey",
    access_log: Annotated[bool, typer.Option(help="log every request")] = True,
    params: Annotated[Path, typer.Option(help="the survey section (per-participant draw, completion code)")]
    = Path("params.yaml"),
) -> None:
    """Run the survey web app (Starlette on uvicorn) until Ctrl-C; every answer is committed when given."""
    import uvicorn

    from pipeline.survey.app import create_app, listening_socket, load_versions
    from pipeline.survey.store import SurveyStore

    with _errors():
        s = _params(params)
        names = [v.strip() for v in versions.split(",") if v.strip()] if versions else None
        found = load_versions(images_dir, names)
        store = SurveyStore(db, seed=s.seed, completion_code=s.completion_code)
        app = create_app(found, store, images_per_participant=s.images_per_participant, display_px=s.display_px,
                         title=title)
        sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    console.print(f"survey on [bold]http://{host}:{bound}{root_path}/[/bold]  versions {', '.join(found)}; "
                  f"responses in {escape(store.url)}  (Ctrl-C stops)", soft_wrap=True)
    config = uvicorn.Config(app, log_level="info", root_path=root_path, proxy_headers=True, timeout_keep_alive=30,
                            access_log=access_log)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()


@survey_app.command("export")
def export(
    db: Annotated[str, typer.Option(help="SQLite file or SQLAlchemy URL the survey wrote to")] = DEFAULT_DB,
    out: Annotated[Path, typer.Option(help="CSV to write (replaced atomically)")] = DEFAULT_RESPONSES,
) -> None:
    """Every answer given so far, one row per answer, as CSV (the input of [bold]analyze[/bold])."""
    from pipeline.core.utils import atomic_path
    from pipeline.survey.store import EXPORT_FIELDS, SurveyStore, SurveyStoreError, database_url, is_export_csv

    with _errors():
        url = database_url(db)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
            raise SurveyStoreError(f"response database not found: {db} (the survey writes it while it runs)")
        store = SurveyStore(url)
        n = 0
        with atomic_path(out, owned=is_export_csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EXPORT_FIELDS)
            w.writeheader()
            for row in store.export_rows():
                w.writerow(row)
                n += 1
        counts = store.counts()
        store.close()
    console.print(f"[green]wrote[/green] {escape(str(out))}: {n} answers from {counts['participants']} participants")


@survey_app.command("analyze")
def analyze(
    responses: Annotated[Path, typer.Argument(help="CSV written by [bold]sipat survey export[/bold]")]
    = DEFAULT_RESPONSES,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for detection.json / .csv / .png")]
    = Path("data/survey/analysis"),
    completed_only: Annotated[bool, typer.Option(help="only participants who answered every question")] = False,
    title: Annotated[str, typer.Option(help="plot title")] = "",
) -> None:
    """Detection rate per ε and version (95 % Wilson intervals), false alarms, d′, and the Fig. 5 plot."""
    from pipeline.survey.analysis import analyse, read_responses, table_rows, write_analysis

    with _errors():
        result = analyse(read_responses(responses), completed_only=completed_only)
        paths = write_analysis(result, out_dir, title)
    table = Table(title=f"{result['n_answers']} answers from {result['n_participants']} participants: share "
                        f"answered \"perturbed\"", box=box.SIMPLE_HEAD, title_justify="left")
    for h in ("version", "ε", "n", "rate", "95 % CI", "d′ [95 % CI]"):
        table.add_column(h, justify="left" if h == "version" else "right")
    for r in table_rows(result):
        table.add_row(*r)
    table.caption = "ε = 0: unperturbed images, the rate is the false-alarm rate"
    console.print(table)
    console.print(f"[green]wrote[/green] {', '.join(escape(str(p)) for p in paths.values())}", soft_wrap=True)


def _parse_curve(text: str) -> dict[int, float]:
    curve = {}
    for part in text.split(","):
        try:
            k, p = part.split(":")
            curve[int(k)] = float(p)
        except ValueError:
            raise typer.BadParameter(f"expected k:p pairs such as 0:0.1,8:0.6, got {part!r}",
                                     param_hint="--curve") from None
        if not 0 <= curve[int(k)] <= 1 or int(k) < 0:
            raise typer.BadParameter(f"{part!r}: k >= 0 and 0 <= p <= 1", param_hint="--curve")
    if 0 not in curve:
        raise typer.BadParameter("the curve needs k = 0 (the false-alarm rate)", param_hint="--curve")
    return curve


@survey_app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Option(help="CSV to write, in the export format")],
    curve: Annotated[str, typer.Option(help="k:p pairs: P(answer \"perturbed\") at ε = k/255")]
    = "0:0.15,4:0.2,8:0.35,16:0.65,32:0.9",
    versions: Annotated[str, typer.Option(help="comma-separated version names")] = "teacher,student",
    participants: Annotated[int, typer.Option(min=1)] = 100,
    images_per_participant: Annotated[int, typer.Option(min=1)] = 10,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Simulated responses from a known detection curve (to try the analysis before real data exist)."""
    from pipeline.survey.analysis import simulate_responses

    c = _parse_curve(curve)
    names = [v.strip() for v in versions.split(",") if v.strip()]
    with _errors():
        rows = simulate_responses({v: c for v in names}, participants,
                                  images_per_participant=images_per_participant, seed=seed, out=out)
    console.print(f"[green]wrote[/green] {escape(str(out))}: {len(rows)} simulated answers "
                  f"({participants} participants)")
