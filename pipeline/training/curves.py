"""Training curves as a PNG: a picture that opens anywhere, with no chart library fetched from the network.

Drawn on matplotlib's object API with the Agg backend (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipeline.core.utils import PNG_MARK, atomic_path


def plot_history(history: list[dict[str, Any]], out: str | Path, *, title: str,
                 selected_epoch: Optional[int] = None, select: Optional[str] = None) -> None:
    """Validation clean and PGD accuracy (left) and training loss (right) per epoch; a dashed line marks the
    epoch whose weights were kept (chosen by `select`: last, clean, robust). Written atomically; an existing
    file at `out` is replaced only if this project wrote it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(8.0, 3.4), dpi=110, layout="constrained")
    acc, loss = fig.subplots(1, 2)
    for key, label in (("val_clean_acc", "validation, clean"), ("val_pgd_acc", "validation, PGD")):
        if any(key in row for row in history):
            acc.plot(epochs, [100 * row[key] if row.get(key) is not None else float("nan") for row in history],
                     marker="o", markersize=3, label=label)
    acc.set_ylabel("accuracy (%)")
    loss.plot(epochs, [row.get("train_loss", float("nan")) for row in history], marker="o", markersize=3,
              color="tab:gray")
    loss.set_ylabel("training loss")
    for ax in (acc, loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="black", linestyle="--", linewidth=0.8)
    if selected_epoch is not None:
        why = {"clean": ", best clean", "robust": ", best PGD"}.get(select or "", "")
        acc.plot([], [], color="black", linestyle="--", linewidth=0.8, label=f"kept: epoch {selected_epoch}{why}")
    acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    with atomic_path(out, kind="png") as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_MARK)
