"""Synthetic salience (eq. 7–8) against a brute-force reference, and human-mask import from a CUB tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from pipeline.core.errors import CheckpointError
from pipeline.data import DatasetError, load_dataset
from pipeline.data.digits import write_cub_tree
from pipeline.human_masks import binarise, extract_human, human_masks
from pipeline.maskstore import MaskStore
from pipeline.models import build_model, save_checkpoint
from pipeline.synthetic_masks import extract_synthetic, input_gradients, salient_set, synthetic_masks

# ------------------------------------------------------------------------------------------- fixtures

N_IMAGES, N_TRAIN, N_CLASSES = 8, 6, 3
GRAY_ID, ZERO_SEG_ID = 2, 3  # image ids (1-based, all in the train split)


def _seg(i: int) -> np.ndarray:
    """Soft-valued 8×8 segmentation of image id i: a 4×4 block at 90 with a 2×2 core at 180."""
    seg = np.zeros((8, 8), dtype=np.uint8)
    if i == ZERO_SEG_ID:
        return seg
    c = i % 3
    seg[2:6, c:c + 4] = 90
    seg[3:5, c + 1:c + 3] = 180
    return seg


def make_cub_tree(root: Path, *, segmentations: bool = True, size: int = 8) -> Path:
    """A tiny CUB-200-2011 tree: 8 JPEGs (one grayscale), 3 classes, 6 train / 2 test, soft PNG segmentations."""
    rng = np.random.default_rng(0)
    images, segs, labels, names = [], [], [], []
    for i in range(1, N_IMAGES + 1):
        cls = (i - 1) % N_CLASSES + 1
        shape = (size, size) if i == GRAY_ID else (size, size, 3)
        images.append(rng.integers(0, 256, shape, dtype=np.uint8))
        seg = _seg(i)
        if size != 8:
            seg = np.asarray(Image.fromarray(seg).resize((size, size), Image.NEAREST))
        segs.append(seg)
        labels.append(cls - 1)
        names.append(f"Bird_{cls}_{i:04d}")
    return write_cub_tree(root, images, labels, [i <= N_TRAIN for i in range(1, N_IMAGES + 1)],
                          [f"{c:03d}.Bird_{c}" for c in range(1, N_CLASSES + 1)],
                          segmentations=segs if segmentations else None, names=names, image_ext=".jpg",
                          jpeg_quality=75)


def save_tiny_checkpoint(path: Path, num_classes: int = N_CLASSES, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes)
    save_checkpoint(path, model, {"arch": "smallcnn", "num_classes": num_classes, "mean": [0.0] * 3,
                                  "std": [1.0] * 3})
    return path


@pytest.fixture
def cub(tmp_path):
    root = make_cub_tree(tmp_path / "CUB_200_2011")
    return load_dataset("cub", str(root), "train", 8)


# ------------------------------------------------------------------------------------------- eq. 7–8

def brute_force(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per sample: take elements by decreasing |score| (earlier index first on ties) until the mass is reached."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        a = scores[b].reshape(-1).abs().double().tolist()
        total = sum(a)
        if total == 0:
            continue
        order = sorted(range(len(a)), key=lambda j: (-a[j], j))
        mass, flat = 0.0, out[b].view(-1)
        for j in order:
            if mass >= fraction * total:
                break
            flat[j] = True
            mass += a[j]
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 1.0])
def test_salient_set_matches_brute_force_with_ties_and_zeros(fraction):
    g = torch.Generator().manual_seed(1)
    # Small integers: many exact ties, many zeros, signs that |.| must ignore.
    scores = torch.randint(-3, 4, (12, 2, 3, 4), generator=g).float()
    scores[4] = 0.0  # an all-zero gradient
    mask, n_zero = salient_set(scores, fraction)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, brute_force(scores, fraction))
    assert n_zero == 1 and not mask[4].any()


def test_salient_set_matches_brute_force_on_continuous_scores():
    scores = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    for fraction in (0.25, 0.5, 0.75):
        assert torch.equal(salient_set(scores, fraction)[0], brute_force(scores, fraction))


def test_salient_mass_reaches_fraction_and_no_smaller_set_does():
    scores = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3)) ** 3  # heavy-tailed
    fraction = 0.5
    mask, _ = salient_set(scores, fraction)
    a = scores.reshape(32, -1).abs().double()
    m = mask.reshape(32, -1)
    total = a.sum(1)
    mass = (a * m).sum(1)
    assert (mass >= fraction * total).all()
    k = m.sum(1)
    # The best set of k-1 elements is the top k-1; it must fall short of the goal.
    top = a.sort(1, descending=True).values.cumsum(1)
    best_smaller = torch.where(k > 1, top.gather(1, (k - 2).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    assert (best_smaller < fraction * total).all()
    # And the chosen set is a top-k set: no unselected element outweighs a selected one.
    lo = torch.where(m, a, torch.full_like(a, float("inf"))).amin(1)
    hi = torch.where(~m, a, torch.zeros_like(a)).amax(1)
    assert (lo >= hi).all()


def test_ties_go_to_the_earlier_index():
    mask, n_zero = salient_set(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, -2.0]]), 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, True, False, False]]
    assert n_zero == 0


def test_salient_set_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        salient_set(torch.ones(2, 4), 0.0)
    with pytest.raises((ValueError, CheckpointError), match="non-finite"):
        salient_set(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), 0.5)


def test_all_zero_batch_gives_empty_masks_not_nan():
    mask, n_zero = salient_set(torch.zeros(3, 1, 2, 2), 0.5)
    assert n_zero == 3 and not mask.any()


# ------------------------------------------------------------------------------------------- synthetic masks

def test_synthetic_masks_are_eq7_of_the_input_gradient(cub):
    torch.manual_seed(0)
    model = build_model("smallcnn", cub.num_classes).train()
    batches = list(synthetic_masks(model, cub, fraction=0.5, batch_size=4, device="cpu", progress=False))
    assert model.training, "the model's mode is restored afterwards"
    assert [s for s, _ in batches] == [0, 4]
    masks = torch.cat([m for _, m in batches])
    assert masks.shape == (len(cub), *cub.image_shape) and masks.dtype == torch.bool
    x = torch.stack([cub[i][0] for i in range(len(cub))])
    y = torch.as_tensor(cub.labels)
    model.eval()
    want = torch.cat([salient_set(input_gradients(model, x[s:s + 4], y[s:s + 4]), 0.5)[0] for s in (0, 4)])
    assert torch.equal(masks, want)
    # The predicted-class target differentiates another loss wherever the prediction is not the label.
    pred = model(x).argmax(1)
    got = torch.cat([m for _, m in synthetic_masks(model, cub, target="predicted", batch_size=8, progress=False)])
    assert torch.equal(got, salient_set(input_gradients(model, x, pred), 0.5)[0])


class _Constant(nn.Module):
    """Logits independent of the input: the input gradient is exactly zero."""

    def __init__(self, k: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_zero_gradients_are_counted_and_left_empty(cub):
    it = synthetic_masks(_Constant(cub.num_classes), cub, batch_size=4, progress=False)
    masks = torch.cat([m for _, m in it])
    assert not masks.any()
    assert it.stats["zero_gradient"] == len(cub)


def test_extract_synthetic_records_provenance(cub, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "teacher.pt")
    attrs = extract_synthetic(ckpt, cub, tmp_path / "s.zarr", fraction=0.3, target="label", batch_size=4,
                              chunk_size=4, device="cpu", progress=False)
    assert attrs["kind"] == "synthetic" and attrs["fingerprint"] == cub.fingerprint()
    assert attrs["params"]["fraction"] == 0.3 and len(attrs["teacher"]["sha256"]) == 64
    assert attrs["counts"]["zero_gradient"] == 0
    store = MaskStore.open(tmp_path / "s.zarr", dataset=cub, kind="synthetic")
    assert 0.0 < store.attrs["coverage"]["mean"] < 0.3 + 1e-6
    with pytest.raises(CheckpointError, match="classes"):
        extract_synthetic(save_tiny_checkpoint(tmp_path / "t5.pt", num_classes=5), cub, tmp_path / "x.zarr",
                          device="cpu", progress=False)
    assert not (tmp_path / "x.zarr").exists()


# ------------------------------------------------------------------------------------------- human masks

def _train_ids(ds) -> list[int]:
    return [int(s.split(":")[0]) for s in ds.ids]


def test_binarise_is_an_absolute_level_as_the_authors_code():
    """Salient where value / 255 >= threshold (Temp_CVPR train_model.py thresholds the [0, 1] map at 0.5):
    a faint segmentation (peak 100) is not rescaled to its own maximum."""
    seg = torch.tensor([[0, 127, 128], [255, 0, 0], [50, 100, 100]], dtype=torch.uint8).view(3, 1, 1, 3)
    got = binarise(seg, 0.5).view(3, 3).tolist()
    assert got == [[False, False, True], [True, False, False], [False, False, False]]
    assert binarise(seg, 100 / 255).view(3, 3)[2].tolist() == [False, True, True]


@pytest.mark.parametrize("threshold,block", [(0.3, 4), (0.5, 2)])  # the block is at 90, its core at 180
def test_human_masks_from_soft_segmentations(cub, threshold, block):
    it = human_masks(cub, threshold=threshold, batch_size=4, workers=2, progress=False)
    masks = torch.cat([m for _, m in it])
    assert masks.shape == (len(cub), 3, 8, 8)
    for row, image_id in enumerate(_train_ids(cub)):
        seg = torch.from_numpy(_seg(image_id))
        want = seg.float() >= threshold * 255
        for c in range(3):  # one channel broadcast over C, the grayscale image included
            assert torch.equal(masks[row, c], want), (image_id, c)
        assert int(masks[row, 0].sum()) == (0 if image_id == ZERO_SEG_ID else block * block)
    assert it.stats == {"missing_segmentations": 0, "unreadable_segmentations": 0}


def test_human_masks_follow_the_image_geometry(tmp_path):
    """A non-square image and its segmentation are resized alike: the salient left half stays the left half."""
    root = make_cub_tree(tmp_path / "cub")
    ds = load_dataset("cub", str(root), "train", 6)
    Image.new("RGB", (20, 10), (200, 30, 30)).save(root / "images" / ds.relpaths[0])
    assert ds[0][0].shape == (3, 6, 6)
    seg = np.zeros((10, 20), dtype=np.uint8)
    seg[:, :10] = 255
    Image.fromarray(seg, mode="L").save(ds.segmentation_path(0))
    m = torch.cat([m for _, m in human_masks(ds, progress=False)])[0, 0]
    assert m[:, :3].all() and not m[:, 3:].any()


def test_missing_segmentation_is_an_error_naming_it(cub):
    gone = cub.segmentation_path(1)
    gone.unlink()
    with pytest.raises(DatasetError, match=gone.name):
        list(human_masks(cub, progress=False))
    it = human_masks(cub, missing="empty", progress=False)
    masks = torch.cat([m for _, m in it])
    assert it.stats["missing_segmentations"] == 1 and not masks[1].any() and masks[0].any()


def test_unreadable_segmentation_is_an_error_naming_it(cub, tmp_path):
    bad = cub.segmentation_path(0)
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=bad.name):
        extract_human(cub, tmp_path / "h.zarr", progress=False)
    assert not (tmp_path / "h.zarr").exists()
    attrs = extract_human(cub, tmp_path / "h.zarr", missing="empty", progress=False)
    assert attrs["counts"]["unreadable_segmentations"] == 1


def test_dataset_without_segmentations_is_refused(tmp_path):
    ds = load_dataset("cub", str(make_cub_tree(tmp_path / "c", segmentations=False)), "train", 8)
    with pytest.raises(DatasetError, match="no human segmentations"):
        human_masks(ds)


def test_extract_human_round_trip(cub, tmp_path):
    attrs = extract_human(cub, tmp_path / "h.zarr", threshold=0.5, chunk_size=4, progress=False)
    assert attrs["kind"] == "human" and attrs["params"]["threshold"] == 0.5
    store = MaskStore.open(tmp_path / "h.zarr", dataset=cub, kind="human")
    want = torch.cat([m for _, m in human_masks(cub, progress=False)])
    assert torch.equal(store.masks(torch.arange(len(cub))), want)
    assert attrs["coverage"]["empty"] == 1  # the all-zero segmentation


class _NaN(_Constant):
    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + float("nan") * x.flatten(1).sum(1, keepdim=True)


def test_non_finite_gradients_abort_without_a_store(cub, tmp_path):
    from pipeline.maskstore.writer import write_mask_store

    it = synthetic_masks(_NaN(cub.num_classes), cub, batch_size=4, progress=False)
    with pytest.raises((ValueError, CheckpointError), match="non-finite"):
        write_mask_store(tmp_path / "s.zarr", it, n=len(cub), shape=cub.image_shape, attrs={})
    assert not (tmp_path / "s.zarr").exists()


def test_both_author_rules_for_human_masks():
    """threshold 0.5: Temp_CVPR train_model.py (perturbed where 1 − map >= 0.5); threshold 1.0:
    SIP-Adversarial-Training run_training.py with PGD_attack_generator.py (the step is sign(∇ · (1 − map)), so
    only pixels at 255 never move). Both emulated on every 8-bit value."""
    seg = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    s = seg.float() / 255
    temp_cvpr_salient = ~((1 - s) >= 0.5)
    grad = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    sip_repo_moves = (grad * (1 - s)).sign() != 0
    assert torch.equal(binarise(seg, 0.5), temp_cvpr_salient)
    assert torch.equal(binarise(seg, 1.0), ~sip_repo_moves)
    assert int(binarise(seg, 1.0).sum()) == 1 and int(binarise(seg, 0.5).sum()) == 128
