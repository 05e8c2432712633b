"""PNG figures: mask grids (cf. the paper's Figures 2 and 4) and accuracy against ε per comparison group.

Figures are drawn on matplotlib's object API with the Agg backend: no pyplot state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.utils import PNG_MARK, atomic_path

if TYPE_CHECKING:
    from pipeline.report import Group


def _figure(**kwargs: Any):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def render_mask_grid(images, rows: list[tuple[str, Any]], titles: list[str], out: str | Path,
                     suptitle: str) -> None:
    """A row of images, then one row per mask set with the mask overlaid in red.

    `images` is float [n, C, H, W] in [0, 1]; each mask set is bool [n, C, H, W]; where only some channels are
    salient the overlay is fainter.
    """
    import numpy as np

    n = images.shape[0]
    nrows = 1 + len(rows)
    fig = _figure(figsize=(1.7 * n + 0.6, 1.75 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, n, squeeze=False)
    pics = images.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    if pics.shape[-1] == 1:
        pics = pics.repeat(3, axis=-1)
    for j in range(n):
        axes[0, j].imshow(pics[j], interpolation="nearest")
        axes[0, j].set_title(titles[j], fontsize=8)
        for r, (_, masks) in enumerate(rows, start=1):
            share = masks[j].float().mean(0).numpy()  # fraction of channels marked salient
            overlay = np.zeros((*share.shape, 4), dtype=np.float32)
            overlay[..., 0] = 1.0
            overlay[..., 3] = 0.6 * share
            axes[r, j].imshow(pics[j] * 0.8, interpolation="nearest")
            axes[r, j].imshow(overlay, interpolation="nearest")
    for r, label in enumerate(["image"] + [name for name, _ in rows]):
        axes[r, 0].set_ylabel(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(suptitle, fontsize=9)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata=PNG_MARK)


def plot_comparison(group: "Group", out: str | Path) -> None:
    """Accuracy against ε for one comparison group (clean accuracy at ε = 0), one line per row of its table,
    error bars = 95 % t interval over seeds; beside it, each strategy's paired difference to Madry with its
    95 % interval, when the group has Madry runs. A missing result leaves a gap. Titled with the group's title."""
    from pipeline.report import REFERENCE, LABELS, eps_value, paired

    cols = group.columns
    xs = [0.0] + [eps_value(c) * 255 for c in cols[1:]]
    base = next((r for r in group.rows if r["strategy"] == REFERENCE), None)
    fig = _figure(figsize=(11.0 if base else 6.4, 4.4), dpi=120, layout="constrained")
    axes = fig.subplots(1, 2 if base else 1, squeeze=False)[0]
    style = lambda r: "--" if r["strategy"].startswith("sip") else "-"  # noqa: E731

    def bar(ci) -> float:
        return ci.half if ci.n > 1 and ci.half == ci.half else 0.0

    for r in group.rows:
        cells = [r["cells"][c] for c in cols]
        means = [e["mean"] for e in cells]
        # an accuracy's interval is cut at 0 and 100 %, as in the tables
        low = [min(bar(e["ci"]), m) for e, m in zip(cells, means)]
        high = [min(bar(e["ci"]), 100.0 - m) for e, m in zip(cells, means)]
        axes[0].errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, label=r["label"], linestyle=style(r))
    axes[0].set_ylim(-2, 102)
    axes[0].set_ylabel("accuracy (%), 95 % interval over seeds")
    if base is not None:
        ax = axes[1]
        ax.axhline(0.0, color="black", linewidth=0.8)
        for i, r in enumerate(group.rows):
            if r is base:
                ax.plot([], [])  # keep each strategy's colour the same in both panels
                continue
            ds = [paired(r, base, c) for c in cols]
            shift = (i - len(group.rows) / 2) * 0.06 * (xs[-1] - xs[0] or 1) / 4  # keep the bars apart
            ax.errorbar([x + shift for x in xs], [d.mean for d in ds], yerr=[bar(d) for d in ds], marker="o",
                        capsize=3, label=r["label"], linestyle=style(r))
        ax.set_ylabel(f"paired difference to {LABELS[REFERENCE]} (points), 95 % interval")
    for ax in axes:
        ax.set_xlabel("ε (×1/255); 0 = clean")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    # the legend below the plots, where it covers no line
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(7, len(labels)), fontsize=8)
    fig.suptitle(group.title, fontsize=9)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_MARK)
