"""`sipat`: command-line tools around the pipeline; they call the same library functions as the DVC stages."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True,
                  help="[bold]SIP-AT[/bold]: salient information preserving adversarial training.")
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the library's expected failures into one red line and exit code 1 (no traceback)."""
    from pipeline.core.errors import SipatError, storage_error

    try:
        yield
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except (SipatError, FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        err_console.print(f"[bold red]error:[/bold red] {escape(str(msg))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as err:  # a full disk, a read-only folder: one line, not a traceback
        text = storage_error(err)
        if text is None:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(text)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/bold red] nothing was written to the output")
        raise typer.Exit(130) from None


# ================================================================================================ data

data_app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True,
                       help="Datasets: [green]export[/green] one in the image-folder layout your own data uses.")
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    out: Annotated[Path, typer.Option(help="folder to write (replaced only if this command wrote it)")],
    dataset: Annotated[str, typer.Option(help="registered dataset to export")] = "digits",
    root: Annotated[Optional[Path], typer.Option(help="its root [dim](embedded data sets: written afresh)[/dim]")]
    = None,
    image_size: Annotated[int, typer.Option(min=4, help="size the images are written at (the digits: 8, as "
                                                        "stored)")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Write a dataset as [bold]train/<class>/[/bold], [bold]test/<class>/[/bold], its human masks as
    [bold]masks/[/bold] and as a COCO file [bold]annotations.json[/bold]: the layout `data.name: folder` reads."""
    import tempfile

    from pipeline.data import DATASETS, load_dataset
    from pipeline.export import export_folder

    with _errors():
        spec = DATASETS.get(dataset, "dataset")
        with tempfile.TemporaryDirectory() as scratch:
            if root is None and spec.embedded_writer is not None:
                root = Path(scratch) / "tree"
                spec.embedded_writer(root)
            splits = {s: load_dataset(dataset, str(root) if root else None, s, image_size) for s in ("train", "test")}
            summary = export_folder(splits, out, progress=not quiet)
    console.print(f"[green]wrote[/green] {escape(str(out))}: {summary['images']} images, {summary['masks']} masks "
                  f"(masks/ and annotations.json)", soft_wrap=True)


# ================================================================================================ masks

masks_app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True,
                        help="Salience mask stores: create ([green]synthetic[/green], [green]human[/green]), "
                             "[green]inspect[/green] and [green]show[/green] them.")
app.add_typer(masks_app, name="masks")


class TargetChoice(str, Enum):
    label = "label"
    predicted = "predicted"


class MissingChoice(str, Enum):
    error = "error"
    empty = "empty"


def _check_unit(value: Optional[float], name: str) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"must be in (0, 1], got {value}", param_hint=name)


def _load_params(params: Path):
    from pipeline.core.config import load_config

    return load_config(params)


def _print_written(out: Path, attrs: dict[str, Any]) -> None:
    cov = attrs.get("coverage", {})
    counts = ", ".join(f"{k} {v}" for k, v in attrs.get("counts", {}).items())
    console.print(f"[green]wrote[/green] {escape(str(out))}: {attrs['n']} {attrs['kind']} masks of "
                  f"{'×'.join(map(str, attrs['image_shape']))}, salient fraction mean {cov.get('mean', 0):.3f} "
                  f"(p5 {cov.get('p5', 0):.3f}, p95 {cov.get('p95', 0):.3f})" + (f"; {counts}" if counts else ""),
                  soft_wrap=True)


@masks_app.command("synthetic")
def masks_synthetic(
    checkpoint: Annotated[Path, typer.Option(help="robust teacher checkpoint (e.g. data/teacher/model.pt)")],
    out: Annotated[Path, typer.Option(help="store to write (replaced atomically)")],
    params: Annotated[Path, typer.Option(help="parameter file: dataset, data root, image size, salience")]
    = Path("params.yaml"),
    fraction: Annotated[Optional[float], typer.Option(help="share of the total |gradient| the mask must hold "
                                                           "[dim](default: salience.fraction)[/dim]")] = None,
    target: Annotated[Optional[TargetChoice], typer.Option(help="class whose loss is differentiated "
                                                                "[dim](default: salience.target)[/dim]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N [dim](default: device)"
                                                       "[/dim]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="[dim](default: salience.batch_size)[/dim]")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Synthetic masks (SIP-S, eq. 7–8) of the training split from a teacher checkpoint.

    Under [bold]torchrun --nproc-per-node N[/bold] the processes split the images and write one store.
    """
    from pipeline.data import load_dataset
    from pipeline.synthetic_masks import extract_synthetic

    _check_unit(fraction, "--fraction")
    with _errors():
        cfg = _load_params(params)
        sal = cfg.salience
        dataset = load_dataset(cfg.dataset, cfg.data.root, "train", cfg.data.image_size)
        attrs = extract_synthetic(
            checkpoint, dataset, out, root=cfg.data.root,
            fraction=fraction if fraction is not None else sal.fraction,
            target=target.value if target is not None else sal.target,
            batch_size=batch_size or sal.batch_size, chunk_size=sal.chunk_size, device=device or cfg.device,
            num_workers=cfg.data.num_workers, progress=not quiet)
    from pipeline.distributed import is_main

    if is_main():  # under torchrun every process returns the same attributes
        _print_written(out, attrs)


@masks_app.command("human")
def masks_human(
    root: Annotated[Path, typer.Option(help="dataset root: a CUB_200_2011 folder (segmentations/ inside or beside "
                                            "it), or your image folder (masks/ inside it, or --coco)")],
    out: Annotated[Path, typer.Option(help="store to write (replaced atomically)")],
    image_size: Annotated[Optional[int], typer.Option(min=4, help="must match training "
                                                                  "[dim](default: data.image_size)[/dim]")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="salient where value / 255 >= threshold "
                                                            "[dim](default: human_masks.threshold)[/dim]")] = None,
    missing: Annotated[Optional[MissingChoice], typer.Option(help="an image without a mask, or with an unreadable "
                                                                  "one: error, or an empty mask [dim](default: "
                                                                  "human_masks.missing)[/dim]")] = None,
    coco: Annotated[Optional[str], typer.Option(help="COCO instances file, relative to --root: masks from its "
                                                     "polygons / RLE instead of mask files [dim](default: "
                                                     "human_masks.coco.file)[/dim]")] = None,
    category: Annotated[Optional[list[str]], typer.Option(help="with --coco: only this category's instances "
                                                               "(repeat for several; default: all)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset name the store is for: [bold]cub[/bold], "
                                              "[bold]folder[/bold] (your images), or [bold]digits[/bold] for the "
                                              "embedded default")] = "cub",
    params: Annotated[Path, typer.Option(help="where defaults come from, when the file exists")]
    = Path("params.yaml"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Human masks (SIP-H) of the training split: from CUB segmentations, a mask folder or a COCO file."""
    from pipeline.core.config import CocoConfig, HumanMaskConfig
    from pipeline.data import load_dataset
    from pipeline.human_masks import extract_human

    _check_unit(threshold, "--threshold")
    if category and coco is None:
        raise typer.BadParameter("needs --coco", param_hint="--category")
    with _errors():
        defaults, size = HumanMaskConfig(), image_size
        chunk_size = batch_size = 256
        if params.exists():
            cfg = _load_params(params)
            defaults, chunk_size, batch_size = cfg.human_masks, cfg.salience.chunk_size, cfg.salience.batch_size
            size = size or cfg.data.image_size
        if size is None:
            raise typer.BadParameter(f"no --image-size given and {params} does not exist", param_hint="--image-size")
        source = CocoConfig(file=coco, categories=category or []) if coco is not None else defaults.coco
        ds = load_dataset(dataset, str(root), "train", size)
        attrs = extract_human(ds, out, root=root,
                              threshold=threshold if threshold is not None else defaults.threshold,
                              missing=missing.value if missing is not None else defaults.missing,
                              chunk_size=chunk_size, batch_size=batch_size, progress=not quiet, coco=source)
    _print_written(out, attrs)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "×".join(map(str, value))
    return str(value)


@masks_app.command("inspect")
def masks_inspect(store: Annotated[Path, typer.Argument(help="a mask store (.zarr folder)")]) -> None:
    """Shape, provenance and coverage of a mask store."""
    from pipeline.maskstore import read_store_attrs, store_disk_bytes, verify_store

    with _errors():
        attrs, packed_shape = read_store_attrs(store)
        scan, problems = verify_store(store)  # reads every chunk: missing or damaged ones are reported
    n, shape = attrs.get("n", 0), attrs.get("image_shape", [])
    elements = n * (shape[0] * shape[1] * shape[2] if len(shape) == 3 else 0)
    disk = store_disk_bytes(store)
    table = Table(title=f"mask store {escape(str(store))}", show_header=False, title_justify="left")
    table.add_column("field", style="bold cyan", no_wrap=True)
    table.add_column("value")
    available = attrs.get("available", True)
    table.add_row("kind", str(attrs.get("kind")))
    table.add_row("available", "yes" if available else f"[red]no[/red]: {escape(str(attrs.get('reason')))}")
    table.add_row("masks", f"{n} × {_fmt(shape)}  (packed {_fmt(list(packed_shape))} uint8)")
    table.add_row("on disk", f"{disk / 1e6:.2f} MB" + (f", {8 * disk / elements:.3f} bits/element" if elements
                                                        else ""))
    table.add_row("dataset", f"{attrs.get('dataset')} / {attrs.get('split')}  root {attrs.get('root')}  "
                             f"image size {attrs.get('image_size')}")
    table.add_row("fingerprint", str(attrs.get("fingerprint")))
    table.add_row("rule", escape(str(attrs.get("rule", ""))))
    table.add_row("params", _fmt(attrs.get("params", {})))
    if "teacher" in attrs:
        table.add_row("teacher", _fmt(attrs["teacher"]))
    if "segmentations" in attrs:
        seg = attrs["segmentations"]
        if isinstance(seg, dict) and "coco" in seg:  # a COCO file: its path, digest and categories
            seg = f"COCO {seg['coco']} (sha256 {str(seg.get('sha256'))[:12]}, categories {seg.get('categories')})"
        table.add_row("segmentations", str(seg))
    cov = attrs.get("coverage", {})
    if cov.get("n"):
        table.add_row("salient fraction", "  ".join(f"{k} {cov[k]:.3f}" for k in
                                                    ("mean", "min", "p5", "p25", "p50", "p75", "p95", "max")
                                                    if k in cov))
        table.add_row("empty masks", f"{scan['empty_masks']} (recorded when written: {cov.get('empty', '?')})")
    if attrs.get("counts"):
        table.add_row("counts", _fmt(attrs["counts"]))
    table.add_row("format", str(attrs.get("format")))
    table.add_row("integrity", f"[red]{escape('; '.join(problems))}[/red]" if problems
                  else f"{scan['chunks']} chunk(s), all present, decodable and as written")
    console.print(table)
    if problems:
        err_console.print(f"[bold red]error:[/bold red] mask store {escape(str(store))} is damaged: "
                          f"{escape('; '.join(problems))}", soft_wrap=True)
        raise typer.Exit(1)


def _reload_dataset(store: Path, attrs: dict[str, Any], root: Optional[Path]):
    from pipeline.data import DatasetError, load_dataset

    try:
        return load_dataset(attrs["dataset"], str(root) if root else attrs.get("root"), attrs["split"],
                            int(attrs["image_size"]))
    except (DatasetError, KeyError) as err:
        raise DatasetError(f"cannot reload the images of {store}: {err.args[0] if err.args else err} "
                           f"(pass --root to point at the dataset)") from None


@masks_app.command("show")
def masks_show(
    store: Annotated[Path, typer.Argument(help="a mask store (.zarr folder)")],
    other: Annotated[Optional[Path], typer.Option(help="a second store of the same dataset, shown below "
                                                       "(e.g. human next to synthetic)")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("masks.png"),
    n: Annotated[int, typer.Option(min=1, max=64, help="number of images")] = 8,
    seed: Annotated[int, typer.Option(help="which images (a seeded random choice)")] = 0,
    root: Annotated[Optional[Path], typer.Option(help="dataset root, if it moved since the store was made")]
    = None,
) -> None:
    """A PNG grid of images with their masks overlaid (cf. the paper's Figures 2 and 4)."""
    import torch

    from pipeline.core.utils import check_output
    from pipeline.figures import render_mask_grid
    from pipeline.maskstore import MaskStore, MaskStoreError, read_store_attrs

    with _errors():
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out}: masks show writes PNG images only; give a name ending in .png")
        check_output(out, kind="png")  # a user's file is never replaced (and is refused before any work)
        attrs, _ = read_store_attrs(store)
        if attrs.get("available") is False:
            raise MaskStoreError(f"mask store {store} holds no masks: {attrs.get('reason')}")
        dataset = _reload_dataset(store, attrs, root)
        stores = [MaskStore.open(store, dataset=dataset)]
        if other is not None:
            stores.append(MaskStore.open(other, dataset=dataset))
        k = min(n, len(dataset))
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(dataset), generator=g)[:k].sort().values
        images = torch.stack([dataset[int(i)][0] for i in idx])  # k <= 64 decodes: not a hot path
        names = getattr(dataset, "class_names", [])
        titles = [f"#{int(i)} {names[dataset.labels[int(i)]][:14] if names else ''}" for i in idx]
        rows = [(f"{s.kind} mask", s.masks(idx).cpu()) for s in stores]
        render_mask_grid(images, rows, titles, out,
                         f"{attrs['dataset']} / {attrs['split']} at {attrs['image_size']}px: "
                         + " vs ".join(f"{s.kind} ({s.attrs.get('coverage', {}).get('mean', 0):.0%} salient)"
                                       for s in stores))
    console.print(f"[green]wrote[/green] {escape(str(out))} ({k} images, {len(stores)} mask set(s))", soft_wrap=True)


# =============================================================================================== report

def _stage_metrics(stage: Optional[str] = None) -> list[Path]:
    """The evaluation metrics files that dvc.yaml declares (of one stage, or of every stage that runs
    `stages.evaluate`): paths are written there only."""
    import yaml

    dvc_yaml = Path("dvc.yaml")
    if not dvc_yaml.is_file():
        raise FileNotFoundError("dvc.yaml not found: run this in the project's root, or name the metrics files")
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    found = [Path(next(iter(m)) if isinstance(m, dict) else m)
             for name, spec in stages.items()
             if (name == stage if stage else "stages.evaluate" in str(spec.get("cmd", "")))
             for m in spec.get("metrics", [])]
    if not found:
        raise FileNotFoundError(f"dvc.yaml declares no metrics{f' for stage {stage!r}' if stage else ''}")
    return found


def _experiment_metrics(all_commits: bool) -> list[dict[str, Any]]:
    """Student metrics of the workspace, HEAD (or every commit) and their finished DVC experiments."""
    import dvc.api

    from pipeline.report import rows_from_experiments

    student = _stage_metrics("evaluate")[0]

    def read(rev: str) -> str:
        if rev == "workspace":
            return student.read_text()
        from dvc.scm import RevError
        from dvc.exceptions import PathMissingError

        try:
            return dvc.api.read(str(student), rev=rev)
        except (PathMissingError, RevError) as err:  # e.g. a baseline commit never run: its experiments still count
            raise FileNotFoundError(str(err)) from None

    return rows_from_experiments(dvc.api.exp_show(num=-1 if all_commits else 1), read)


def _print_group(group) -> None:
    """A group's title, accuracy table, paired differences to Madry, the claims' verdicts, protocol and notes,
    laid out within the terminal's width (columns stack into blocks; no number is ever cut)."""
    from pipeline.report import accuracy_table, claim_lines, difference_table, text_table

    width = max(40, console.width)
    say = lambda text, style="": console.print(  # noqa: E731
        f"[{style}]{escape(text)}[/{style}]" if style else escape(text), soft_wrap=False, highlight=False,
        overflow="fold", crop=False)
    say(group.title, "bold")
    say("accuracy (%): mean ± std over seeds, then the 95 % interval; * best", "dim")
    for line in text_table(*accuracy_table(group), width=width):
        say(line)
    diff = difference_table(group)
    if diff is not None:
        console.print()
        say("paired difference to Madry (points): mean, then the 95 % interval", "dim")
        for line in text_table(*diff, width=width):
            say(line)
    if group.claims:
        console.print()
        for line in claim_lines(group):
            say(line, "" if line.startswith(" ") else "bold")
    console.print()
    say(group.details, "dim")
    for note in group.notes:
        say(f"• {note}", "yellow")
    console.print()


def _provenance_md(metrics_dir: Path) -> Optional[str]:
    from pipeline.results import load_provenance, provenance_markdown, what_changed

    prov = load_provenance(metrics_dir)
    if prov is None:
        return None
    return provenance_markdown(prov, what_changed(Path.cwd(), prov))


def _with_provenance(md: str, metrics_dir: Path) -> str:
    prov = _provenance_md(metrics_dir)
    if prov is None:
        return md
    head, _, rest = md.partition("\n\n")
    return f"{head}\n\n{prov}\n{rest}"


def _publish(readme: Path, metrics_dir: Path, groups, plots: dict, check: bool) -> None:
    """Replace (or, with `check`, compare) the README's section for `metrics_dir` with the groups' tables,
    plots and verdicts, headed by the folder's provenance and what changed since."""
    import os

    from pipeline.core.utils import atomic_path
    from pipeline.figures import plot_comparison
    from pipeline.report import group_markdown
    from pipeline.results import replace_section, section

    if not readme.is_file():
        raise FileNotFoundError(f"README not found: {readme}")
    name = metrics_dir.resolve().name
    prov = _provenance_md(metrics_dir)
    if prov is None:
        raise FileNotFoundError(f"{metrics_dir / 'provenance.json'} not found: a published result needs its "
                                f"provenance (`sipat grid collect GRID --out {metrics_dir}`)")
    parts = [prov]
    for g in groups:
        parts.append(group_markdown(g, os.path.relpath(plots[g.slug], readme.parent), level=3))
    body = "\n".join(parts)
    text = readme.read_text()
    new = replace_section(text, name, body)
    if check:
        if new != text:
            old_lines = (section(text, name) or "").splitlines()
            first = next((i for i, (a, b) in enumerate(zip(old_lines, body.splitlines())) if a != b),
                         min(len(old_lines), len(body.splitlines())))
            shown = body.splitlines()[first] if first < len(body.splitlines()) else "(end)"
            raise ValueError(f"{readme}'s section results:{name} is not what {metrics_dir} and the current code "
                             f"give (first difference at its line {first + 1}: {shown!r}); rebuild it with "
                             f"`sipat report --metrics-dir {metrics_dir} --readme {readme} --plot "
                             f"{plots[groups[0].slug].parent}/{name}.png`")
        console.print(f"{escape(str(readme))}: section results:{escape(name)} is up to date")
        return
    for g in groups:
        plot_comparison(g, plots[g.slug])
    # only the section between the markers changes; the rest of the file is the user's and stays as it is
    with atomic_path(readme, owned=lambda _p: True) as tmp:
        tmp.write_text(new)
    console.print(f"replaced section results:{escape(name)} of {escape(str(readme))} "
                  f"({len(groups)} group(s), plots {escape(', '.join(str(p) for p in plots.values()))})",
                  overflow="fold")


@app.command("report")
def report(
    metrics_dir: Annotated[Optional[Path], typer.Option("--metrics-dir", help="a folder of metrics JSON files "
                           "(searched recursively) instead of the DVC experiments of this repository")] = None,
    out_md: Annotated[Path, typer.Option("--out", help="Markdown: one section per group of comparable runs")]
    = Path("reports/comparison.md"),
    out_png: Annotated[Path, typer.Option("--plot", help="accuracy vs ε plots (PNG): one per group, named "
                                                         "[bold]<stem>_<group>.png[/bold] beside this path")]
    = Path("reports/comparison.png"),
    all_commits: Annotated[bool, typer.Option("--all-commits", help="experiments of every commit, not just HEAD")] = False,
    readme: Annotated[Optional[Path], typer.Option("--readme", help="with --metrics-dir: replace the section "
                      "between [bold]<!-- results:NAME -->[/bold] and [bold]<!-- /results:NAME -->[/bold] of this "
                      "file (NAME: the folder's name) instead of writing --out")] = None,
    check: Annotated[bool, typer.Option("--check", help="with --readme: write nothing; exit 1 when the section "
                     "differs from what the metrics folder and the current code give")] = False,
) -> None:
    """Paper-style tables: rows strategies, columns clean and each ε, mean ± std over seeds, best in bold.

    One table and plot per group of comparable runs (same dataset, model, training budget and schedule,
    evaluated points and ε set); a run found in several places (the workspace and its experiment) counts once.
    """
    import os

    from pipeline.core.utils import TEXT_MARK, atomic_path, check_output
    from pipeline.figures import plot_comparison
    from pipeline.report import compare, load_metrics_dir, plot_path, to_markdown

    with _errors():
        if (readme or check) and metrics_dir is None:
            raise ValueError("--readme and --check publish a results folder: give it with --metrics-dir")
        if check and readme is None:
            raise ValueError("--check compares a README section: give the file with --readme")
        if metrics_dir is not None:
            if not metrics_dir.is_dir():
                raise FileNotFoundError(f"metrics folder not found: {metrics_dir}")
            rows, where = load_metrics_dir(metrics_dir), str(metrics_dir)
        else:
            rows, where = _experiment_metrics(all_commits), "DVC experiments"
        if not rows:
            raise ValueError(f"no evaluated student runs found in {where}")
        groups, warnings = compare(rows)
        plots = {g.slug: plot_path(out_png, g.slug) for g in groups}
        if readme is not None:
            _publish(readme, metrics_dir, groups, plots, check)
            return
        check_output(out_md, kind="text")  # a user's file there is refused before any plot is written
        for p in plots.values():
            check_output(p, kind="png")
        for g in groups:
            plot_comparison(g, plots[g.slug])
        md = to_markdown(groups, {s: os.path.relpath(p, out_md.parent) for s, p in plots.items()})
        if metrics_dir is not None:
            md = _with_provenance(md, metrics_dir)
        with atomic_path(out_md) as tmp:
            tmp.write_text(md.rstrip("\n") + f"\n\n{TEXT_MARK}\n")
    for w in warnings:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}", soft_wrap=True)
    for g in groups:
        _print_group(g)
    n_runs = sum(len(g.runs) for g in groups)
    console.print(f"wrote [bold]{escape(str(out_md))}[/bold] and {len(plots)} plot(s) "
                  f"({escape(', '.join(str(p) for p in plots.values()))}) from {n_runs} run(s) in {len(groups)} "
                  f"group(s) ({escape(where)})", overflow="fold")


@app.command("metrics")
def metrics(
    files: Annotated[Optional[list[Path]], typer.Argument(help="metrics JSON files written by the evaluation")] = None,
) -> None:
    """Clean and AutoAttack robust accuracy (%) of evaluated models, one row per metrics file
    ([bold]dvc metrics show[/bold] lists every key, including the per-attack breakdown)."""
    from pipeline.report import is_metrics, metrics_problem, summary_table

    with _errors():
        paths = files or _stage_metrics()
        runs = {}
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"metrics file not found: {path} (run the evaluation first: dvc repro)")
            try:
                obj = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            if not is_metrics(obj):
                raise ValueError(f"{path} is not an evaluation result (no clean_acc / robust_acc)")
            problem = metrics_problem(obj)
            if problem is not None:
                raise ValueError(f"{path}: {problem}")
            runs[path.stem if path.stem not in runs else str(path)] = obj
        head, rows = summary_table(runs)
    table = Table(title="accuracy (%): clean, and AutoAttack (standard, L∞) at each ε", box=box.SIMPLE_HEAD)
    for h in head:
        table.add_column(h, justify="left" if h in ("file", "strategy") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console.print(table)


# ================================================================================================= grid

grid_app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True,
                       help="A grid of student runs (strategies × seeds) as DVC experiments: [green]run[/green] "
                            "it on the local DVC queue or on SLURM, [green]status[/green], [green]resume[/green].")
app.add_typer(grid_app, name="grid")


class ExecutorChoice(str, Enum):
    local = "local"
    slurm = "slurm"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@grid_app.command("run")
def grid_run(
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="conf/protocol/NAME.yaml")] = "digits",
    strategies: Annotated[str, typer.Option("--strategies", help="comma-separated")]
    = "basic,madry,trades,fat,part,sip_s,sip_h",
    seeds: Annotated[str, typer.Option("--seeds", help="comma-separated student seeds")] = "0,1,2",
    overrides: Annotated[Optional[list[str]], typer.Option("-S", "--set", help="KEY=VALUE for every run, as "
                         "[bold]dvc exp run -S[/bold] (repeatable)")] = None,
    executor: Annotated[ExecutorChoice, typer.Option("--executor", "-e", help="local: this machine's DVC queue; "
                        "slurm: one shared-stages job, then a job array")] = ExecutorChoice.local,
    resources: Annotated[Optional[list[str]], typer.Option("-R", "--resource", help="KEY=VALUE over "
                         "conf/resources.yaml: gpus, cpus, mem_gb, time_min, partition, account; "
                         "[bold]shared.[/bold]KEY or [bold]student.[/bold]KEY for one kind of job")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="grid name (experiments are NAME-STRATEGY-sSEED)")]
    = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="work folder on the shared file system "
                       "(default .grid/NAME)")] = None,
    shared_from: Annotated[Optional[str], typer.Option("--shared-from", help="slurm: use the teacher and masks "
                           "of this earlier grid (same baseline, protocol and -S) instead of building them")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="local: experiments at once")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every job, its resources and commands; "
                       "submit nothing")] = False,
) -> None:
    """Run a grid of students; the teacher and masks are built once, every run lands as a DVC experiment."""
    from pipeline import grid as g

    with _errors():
        try:
            seed_list = [int(s) for s in _csv(seeds)]
        except ValueError:
            raise typer.BadParameter(f"expected integers, got {seeds!r}", param_hint="--seeds") from None
        grid, problems = g.plan(Path.cwd(), protocol, _csv(strategies), seed_list, overrides or [],
                                executor=executor.value, name=name, workdir=workdir, resources=resources or [],
                                shared_from=shared_from, jobs=jobs)
        if problems:  # nothing is submitted unless every cell can run
            for line in problems:
                err_console.print(f"[bold red]error:[/bold red] {escape(line)}", soft_wrap=True, highlight=False)
            err_console.print(f"nothing submitted ({len(problems)} problem(s))")
            raise typer.Exit(1)
        for line in g.describe(grid):
            console.print(escape(line), soft_wrap=True, highlight=False)
        if dry_run:
            console.print("[yellow]dry run:[/yellow] nothing submitted")
            return
        g.submit(grid)
        if executor is ExecutorChoice.local:
            g.start_local_workers(grid, jobs)
    shared_text = ("" if grid.executor == "local" else
                   f"shared stages of grid {escape(Path(grid.shared_from).name)}, " if grid.shared_from else
                   f"shared job {grid.shared_job_id}, ")
    ids = sorted({c.job_id.split("_")[0] for c in grid.cells if c.job_id})
    console.print(f"[green]submitted[/green] grid {escape(grid.name)}: {shared_text}{len(grid.cells)} run(s)"
                  + (f" (SLURM job {', '.join(ids)})" if ids else "")
                  + f"; follow it with `sipat grid status {escape(grid.name)}`", soft_wrap=True)


_STATE_STYLE = {"pending": "dim", "running": "cyan", "done": "green", "failed": "bold red"}


@grid_app.command("status")
def grid_status(
    name: Annotated[Optional[str], typer.Argument(help="grid name (default: the latest under .grid/)")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="the grid's work folder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Each run: pending, running, done or failed (with its log), from SLURM's own record; and what is left."""
    from dataclasses import asdict

    from pipeline import grid as g

    with _errors():
        grid = g.find_grid(Path.cwd(), name, workdir)
        cells, source = g.status(grid)
    if as_json:
        for c in cells:
            print(json.dumps(asdict(c)))
        return
    table = Table(title=f"grid {escape(grid.name)} ({escape(grid.executor)}; states from {escape(source)})",
                  box=box.SIMPLE_HEAD)
    for h in ("run", "job", "state", "detail"):
        table.add_column(h, overflow="fold")
    for c in cells:
        table.add_row(escape(c.name), c.job_id or "", f"[{_STATE_STYLE[c.state]}]{c.state}[/]", escape(c.detail))
    console.print(table)
    runs = [c for c in cells if c.name != "(shared stages)"]
    count = {s: sum(c.state == s for c in runs) for s in _STATE_STYLE}
    left = count["pending"] + count["running"]
    console.print(f"{count['done']} done, {count['running']} running, {count['pending']} pending, "
                  f"{count['failed']} failed of {len(runs)}; left: {left}"
                  + ("; failed runs resume with `sipat grid resume`" if count["failed"] else ""))


@grid_app.command("resume")
def grid_resume(
    name: Annotated[Optional[str], typer.Argument(help="grid name (default: the latest under .grid/)")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="the grid's work folder")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be submitted")] = False,
) -> None:
    """Submit again the runs that failed or were lost, each in its own clone (training and evaluation continue
    where they stopped); the shared job only if it did not finish."""
    from pipeline import grid as g

    with _errors():
        grid = g.find_grid(Path.cwd(), name, workdir)
        cells = g.to_resume(grid)
        shared = (grid.executor == "slurm" and grid.shared_from is None
                  and g.shared_state(grid) not in (g.DONE, g.PENDING, g.RUNNING))
        if not cells and not shared:
            if grid.executor == "local" and any(s.state == g.PENDING for s in g.status(grid)[0]):
                g.start_local_workers(grid, grid.jobs)  # queued runs with no worker: start them
                console.print(f"grid {escape(grid.name)}: nothing failed; queue workers started for its queued runs")
                return
            console.print(f"grid {escape(grid.name)}: nothing to resume (no run failed or was lost)")
            return
        for line in g.describe(grid, cells, shared=shared):
            console.print(escape(line), soft_wrap=True, highlight=False)
        if dry_run:
            console.print("[yellow]dry run:[/yellow] nothing submitted")
            return
        g.submit(grid, cells)
        if grid.executor == "local":
            g.start_local_workers(grid, grid.jobs)
    console.print(f"[green]resubmitted[/green] {len(cells)} run(s) of grid {escape(grid.name)}")


@grid_app.command("collect")
def grid_collect(
    name: Annotated[Optional[str], typer.Argument(help="grid name (default: the latest under .grid/)")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for the metrics files and provenance.json "
                   "(commit it: `sipat report --metrics-dir` rebuilds the tables from it offline)")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="the grid's work folder")] = None,
) -> None:
    """Gather a grid's finished runs into a results folder: one metrics file per run, the teacher's, and the
    provenance (commit, processor, command, wall time, digests of the code and the parameters)."""
    from pipeline import grid as g
    from pipeline.results import collect

    with _errors():
        if out is None:
            raise typer.BadParameter("give the results folder", param_hint="--out")
        grid = g.find_grid(Path.cwd(), name, workdir)
        prov = collect(Path.cwd(), grid, out)
    console.print(f"collected {prov['runs']} run(s) of grid {escape(grid.name)} into {escape(str(out))}"
                  + (f"; not finished: {len(prov['missing'])}" if prov["missing"] else ""), overflow="fold")


# =============================================================================================== survey

from pipeline.survey.cli import survey_app  # noqa: E402  (commands import their heavy modules lazily)

app.add_typer(survey_app, name="survey")


if __name__ == "__main__":
    app()
