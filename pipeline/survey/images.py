"""Survey image sets: a class-balanced pool of test images, each attacked at every survey budget, as 8-bit PNGs.

The attack runs in floating point; the result is then put on the 8-bit grid by rounding to the nearest level
and clipping into the budget's ball around the clean image (which is itself 8-bit), so a stored image is never
further than k/255 from the clean one, k = ε·255. Rounding can undo an attack that only just succeeded, so each
image is classified again after rounding and the manifest says whether it still fools the model.

A perturbed image may differ from its clean image only in what people are asked about, the perturbation's size:
a grey image (all channels equal) is attacked with one δ shared by its channels, so it stays grey and colour
gives nothing away (manifest column `constraint`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core.errors import CheckpointError, DatasetError, OutputConflict
from pipeline.core.utils import atomic_path, sha256_file
from pipeline.data import ImageDataset
from pipeline.survey.manifest import FORMAT, MANIFEST, MANIFEST_FIELDS, META, read_image_set  # noqa: F401

log = logging.getLogger(__name__)


def select_pool(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` distinct indices of every class (all of a smaller class), seeded; sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def select_example_images(labels: np.ndarray, pool: np.ndarray, seed: int) -> np.ndarray:
    """Two images for the instructions' example pairs, outside the pool where the split allows, of two classes."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed + 1)
    rest = np.setdiff1d(np.arange(len(labels)), pool)
    cand = rng.permutation(rest) if len(rest) >= 2 else rng.permutation(len(labels))
    if len(cand) < 2:
        raise DatasetError(f"the test split has {len(labels)} image(s); the survey needs at least 2")
    first = int(cand[0])
    other = [int(i) for i in cand[1:] if labels[i] != labels[first]]
    return np.array([first, other[0] if other else int(cand[1])])


def quantise_into_ball(x_adv: torch.Tensor, clean_u8: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 image nearest to `x_adv` (float in [0, 1]) within k levels of `clean_u8` in every element."""
    clean = clean_u8.to(torch.int16)
    q = (x_adv.float() * 255.0).round().to(torch.int16)
    q = torch.maximum(torch.minimum(q, clean + k), clean - k).clamp_(0, 255)
    return q.to(torch.uint8)


def is_grey(x: torch.Tensor) -> torch.Tensor:
    """Per image of a (N, C, H, W) batch: all channels equal (always true for one channel)."""
    return (x == x[:, :1]).flatten(1).all(1)


class _SharedChannels(nn.Module):
    """`net` fed a one-channel image repeated to its `channels` channels: attacking this attacks with one δ
    shared by all channels."""

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.net, self.channels = net, channels  # not `module`: pgd would unwrap that as a DDP wrapper
        self.train(net.training)  # pgd restores the mode it found, which must be the network's own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, self.channels, -1, -1))


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, attack: str, steps: int,
               seed: int, grey: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Untargeted L∞ attack that uses the whole budget on every image (not only until it is misclassified).

    apgd-ce: AutoAttack's APGD on the cross-entropy, returning each image's highest-loss iterate
    (`best_loss=True`); pgd: the project's PGD (uniform start, step 2.5·ε/steps), returning the last iterate.
    grey: bool per image; those images are attacked through one channel repeated to all channels (one δ
    shared by the channels, so they come back grey), the others with a δ per channel.
    """
    channels = x.shape[1]
    if grey is None or channels == 1 or not bool(grey.any()):
        return _attack(model, x, y, eps, attack=attack, steps=steps, seed=seed)
    out = torch.empty_like(x)
    out[grey] = _attack(_SharedChannels(model, channels), x[grey][:, :1], y[grey], eps, attack=attack,
                        steps=steps, seed=seed).expand(-1, channels, -1, -1)
    if not bool(grey.all()):
        out[~grey] = _attack(model, x[~grey], y[~grey], eps, attack=attack, steps=steps, seed=seed)
    return out


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, attack: str, steps: int,
            seed: int) -> torch.Tensor:
    if attack == "apgd-ce":
        from pyautoattack.autopgd_base import APGDAttack

        apgd = APGDAttack(model, n_iter=steps, norm="Linf", n_restarts=1, eps=eps, seed=seed, loss="ce",
                          device=x.device)
        with torch.random.fork_rng(devices=[]):  # APGD draws its start from the global generator
            torch.manual_seed(seed)
            return apgd.perturb(x, y, best_loss=True).detach()
    if attack == "pgd":
        from pipeline.attacks import pgd

        g = torch.Generator(device=x.device).manual_seed(seed)
        return pgd(model, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps, init="uniform", generator=g)
    raise ValueError(f"unknown survey attack {attack!r}; choose apgd-ce or pgd")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def _png(img_u8: torch.Tensor, path: Path) -> None:
    arr = img_u8.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB").save(path)


def _name(role: str, index: int, k: int) -> str:
    return f"images/{role}_{index:05d}_e{k:03d}.png"


def _check_output(out: Path) -> None:
    if out.exists() and not (out / META).is_file():
        raise OutputConflict(f"{out} exists and is not a survey image set (no {META}); move it away or choose "
                             f"another output folder")


def build_image_set(model: nn.Module, meta: dict[str, Any], dataset: ImageDataset, out: str | Path, *,
                    version: str, eps_list: list[float], per_class: int, attack: str, steps: int, seed: int,
                    batch_size: int, device: torch.device, checkpoint: Optional[str | Path] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Write the image set of one survey version to `out` (replaced atomically); returns the summary metrics.

    Folder contents: `images/*.png`, `manifest.csv` (one row per image) and `set.json` (provenance, the
    example pairs and the summary).
    """
    out = Path(out)
    _check_output(out)
    if meta.get("num_classes") not in (None, dataset.num_classes):
        raise CheckpointError(f"{checkpoint}: model has {meta['num_classes']} classes, dataset "
                              f"{dataset.name!r} has {dataset.num_classes}")
    t0 = time.perf_counter()
    ks = sorted({int(round(e * 255)) for e in eps_list})
    labels = np.asarray(dataset.labels)
    pool = select_pool(labels, per_class, seed)
    examples = select_example_images(labels, pool, seed)
    idx = np.concatenate([pool, examples])
    roles = ["pool"] * len(pool) + ["example"] * len(examples)
    clean_u8 = torch.stack([dataset.image_uint8(int(i)) for i in idx])  # a few hundred decodes at most
    y = torch.as_tensor(labels[idx], dtype=torch.long)
    model = model.to(device).eval()
    names = getattr(dataset, "class_names", [])

    rows: list[dict[str, Any]] = []
    batches = [(k, s) for k in [0] + ks for s in range(0, len(idx), batch_size)]
    clean_pred = torch.empty(len(idx), dtype=torch.long)
    grey = is_grey(clean_u8)
    with atomic_path(out, is_dir=True, owned=lambda p: (p / META).is_file()) as tmp:
        (tmp / "images").mkdir()
        for k, s in tqdm(batches, desc=f"survey images ({version})", unit="batch", disable=not progress):
            sl = slice(s, s + batch_size)
            xc_u8 = clean_u8[sl].to(device)
            xc = xc_u8.float() / 255.0
            yb = y[sl].to(device)
            if k == 0:
                q = xc_u8
                pred = _predict(model, xc)
                clean_pred[sl] = pred.cpu()
                adv_float = pred != yb
            else:
                x_adv = run_attack(model, xc, yb, k / 255.0, attack=attack, steps=steps, seed=seed + k,
                                   grey=grey[sl].to(device))
                adv_float = _predict(model, x_adv) != yb
                q = quantise_into_ball(x_adv, xc_u8, k)
                pred = _predict(model, q.float() / 255.0)
            diff = (q.to(torch.int16) - xc_u8.to(torch.int16)).abs().flatten(1)
            linf, mean_abs = diff.amax(1).cpu(), diff.float().mean(1).cpu()
            pred, adv_float, q = pred.cpu(), adv_float.cpu(), q.cpu()
            for j in range(q.shape[0]):  # one PNG per image: file I/O, not a tensor hot path
                i = s + j
                fname = _name(roles[i], int(idx[i]), k)
                _png(q[j], tmp / fname)
                lab = int(y[i])
                rows.append({
                    "file": fname, "version": version, "role": roles[i], "index": int(idx[i]),
                    "image_id": dataset.ids[int(idx[i])], "label": lab,
                    "class_name": names[lab] if lab < len(names) else str(lab), "eps_255": k,
                    "eps": round(k / 255.0, 8), "linf_255": int(linf[j]), "mean_abs_255": round(float(mean_abs[j]), 4),
                    "clean_pred": int(clean_pred[i]), "pred": int(pred[j]),
                    "clean_correct": bool(clean_pred[i] == lab), "adversarial_float": bool(adv_float[j]),
                    "still_adversarial": bool(pred[j] != lab), "attack": "none" if k == 0 else attack,
                    "constraint": "none" if k == 0 else ("grey" if grey[i] else "per-channel")})
        rows.sort(key=lambda r: (r["role"] != "pool", r["index"], r["eps_255"]))
        summary = summarise(rows, ks)
        summary.update(version=version, attack=attack, steps=steps, seed=seed, n_pool=int(len(pool)),
                       grey_pool_images=int(grey[:len(pool)].sum()), per_class=per_class,
                       seconds=round(time.perf_counter() - t0, 2))
        with open(tmp / MANIFEST, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            w.writerows(rows)
        ex = [int(examples[0]), int(examples[1])]
        info = {
            "format": FORMAT, "version": version, "dataset": dataset.name, "split": dataset.split,
            "image_size": dataset.image_size, "fingerprint": dataset.fingerprint(),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": sha256_file(checkpoint, 16) if checkpoint else None,
            "model": {k: meta.get(k) for k in ("arch", "role", "strategy", "seed", "dataset") if k in meta},
            "attack": {"name": attack, "norm": "Linf", "steps": steps, "seed": seed, "untargeted": True,
                       "returns": "highest-loss iterate" if attack == "apgd-ce" else "last iterate",
                       "constraint": {"grey": "images with equal channels: one δ shared by all channels, so "
                                              "they stay grey",
                                      "per-channel": "other images: one δ per channel"},
                       "grey_images": int(grey.sum()), "images": int(len(idx))},
            "rounding": "nearest 8-bit level, clipped to [clean - k, clean + k] ∩ [0, 255] (k = eps·255)",
            "eps_255": ks, "per_class": per_class, "pool": [int(i) for i in pool],
            "examples": [
                {"clean": _name("example", ex[0], 0), "perturbed": _name("example", ex[0], ks[-1]),
                 "eps_255": ks[-1], "what": "strong"},
                {"clean": _name("example", ex[1], 0), "perturbed": _name("example", ex[1], ks[0]),
                 "eps_255": ks[0], "what": "subtle"}],
            "summary": summary,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META).write_text(json.dumps(info, indent=2) + "\n")
    log.info("survey set %s: %d pool images x %d budgets written to %s", version, len(pool), len(ks) + 1, out)
    return summary


def summarise(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Per-budget metrics of the pool images (the examples are left out)."""
    pool = [r for r in rows if r["role"] == "pool"]
    per_eps = {}
    for k in [0] + ks:
        rs = [r for r in pool if r["eps_255"] == k]
        correct = [r for r in rs if r["clean_correct"]]
        per_eps[f"eps_{k}_255"] = {
            "n": len(rs),
            "misclassified": round(float(np.mean([r["still_adversarial"] for r in rs])), 4) if rs else 0.0,
            # attack success among the images the model gets right when clean
            "fooled": round(float(np.mean([r["still_adversarial"] for r in correct])), 4) if correct else 0.0,
            "lost_by_rounding": sum(r["adversarial_float"] and not r["still_adversarial"] for r in rs),
            "linf_255_max": max((r["linf_255"] for r in rs), default=0),
            "mean_abs_255": round(float(np.mean([r["mean_abs_255"] for r in rs])), 4) if rs else 0.0,
            "inside_ball": all(r["linf_255"] <= k for r in rs),
        }
    return {"pool_clean_accuracy": round(float(np.mean([r["clean_correct"] for r in pool])), 4) if pool else 0.0,
            "all_inside_ball": all(r["linf_255"] <= r["eps_255"] for r in rows), "per_eps": per_eps}


def build_from_checkpoint(cfg, checkpoint: str | Path, version: str, out: str | Path, *,
                          device: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """`build_image_set` for a checkpoint file on the test split of the configured dataset (`cfg`: Config)."""
    from pipeline.core.utils import resolve_device
    from pipeline.data import load_dataset
    from pipeline.models import load_checkpoint

    if not version or not all(c.isalnum() or c in "_-" for c in version):
        raise ValueError(f"version name {version!r}: use letters, digits, '_' or '-'")
    dev = resolve_device(device or cfg.device)
    try:
        model, meta = load_checkpoint(checkpoint, dev)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {err}") from None
    dataset = load_dataset(cfg.dataset, cfg.data.root, "test", cfg.data.image_size)
    if meta.get("dataset") not in (None, cfg.dataset):
        raise CheckpointError(f"{checkpoint} was trained on {meta['dataset']!r}, params.yaml names {cfg.dataset!r}")
    s = cfg.survey
    return build_image_set(model, meta, dataset, out, version=version, eps_list=s.eps, per_class=s.per_class,
                           attack=s.attack, steps=s.steps, seed=s.seed, batch_size=s.batch_size, device=dev,
                           checkpoint=checkpoint, progress=progress)
