"""Random crop (zero padding) and horizontal flip applied to a batch, identically to its masks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, mask: Optional[torch.Tensor], padding: int,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample random crop of size H×W from the zero-padded image, then a random horizontal flip.

    One gather serves the whole batch; the mask goes through exactly the same geometry as its image
    (padded area counts as non-salient).
    """
    b, _, h, w = x.shape
    g = generator
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    rows = oy[:, None] + torch.arange(h)[None, :]  # B×H
    cols = ox[:, None] + torch.arange(w)[None, :]  # B×W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    bidx = torch.arange(b, device=x.device)[:, None, None]

    def apply(t: torch.Tensor) -> torch.Tensor:
        p = F.pad(t, (padding,) * 4) if padding else t
        out = p[bidx, :, rows[:, :, None], cols[:, None, :]]  # B×H×W×C
        return out.permute(0, 3, 1, 2).contiguous()

    return apply(x), (apply(mask) if mask is not None else None)
