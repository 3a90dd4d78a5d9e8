"""Pictures of what was trimmed: which patches of an image each token still covers.

`token_groups(model, *inputs, stream="image")` runs one forward of a trimmed model with
source tracking on and returns, per example, the patch grid filled with the slot of the token
that now covers each patch (``-1`` where the patch was dropped); `draw` paints such a grid
over the image: dropped patches dimmed, patches merged into one token outlined together, one
colour per group. Both work for any adapted stream whose adapter states its patch grid
(`trimkit.StreamDesc.grid`); `patch_groups` and `draw` are pure tensor functions that know no
model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import api

__all__ = ["draw", "patch_groups", "token_groups"]

#: outline colours of merged groups (RGB), cycled by group
PALETTE = torch.tensor([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195]], dtype=torch.uint8)


def patch_groups(source: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``source`` (``N0`` or ``B×N0``: the slot each entry token belongs to, ``-1`` once
    dropped; `trimkit.TokenState.source`) → the patches' slots on the grid, ``rows×cols``
    (or ``B×rows×cols``). The last ``rows·cols`` entry tokens are the patches."""
    rows, cols = grid
    if source.shape[-1] < rows * cols:
        raise ValueError(f"source covers {source.shape[-1]} entry tokens, fewer than the "
                         f"{rows}×{cols} patches of the grid")
    return source[..., source.shape[-1] - rows * cols:].reshape(*source.shape[:-1], rows, cols)


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    """``3×H×W`` or ``H×W×3``, float in [0, 1] or uint8 → ``H×W×3`` float in [0, 1]."""
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"expected an RGB image 3×H×W or H×W×3, got shape {tuple(image.shape)}")
    img = image.detach().cpu()
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.permute(1, 2, 0)
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    return img.clamp(0.0, 1.0)


def draw(image: torch.Tensor, groups: torch.Tensor, *, dim: float = 0.25,
         line: int | None = None) -> torch.Tensor:
    """Paint ``groups`` (``rows×cols`` slots from `patch_groups`, ``-1`` = dropped) over
    ``image`` (``3×H×W`` or ``H×W×3``, float in [0, 1] or uint8; any size, the grid is
    stretched over it): dropped patches are darkened to ``dim`` of their brightness, and
    each group of patches merged into one token is outlined in its own colour (lines
    ``line`` pixels wide, default about a tenth of a patch). A kept patch that is its own
    token is left as it is. Returns ``H×W×3`` uint8."""
    img = _as_rgb(image)
    h, w = img.shape[:2]
    rows, cols = groups.shape
    ys = torch.arange(h) * rows // h
    xs = torch.arange(w) * cols // w
    g = groups.detach().cpu().long()
    pix = g[ys][:, xs]  # H×W slot of each pixel
    out = torch.where((pix < 0)[..., None], img * dim, img)
    live = g[g >= 0]
    counts = torch.bincount(live, minlength=int(live.max()) + 1 if live.numel() else 1)
    merged = (pix >= 0) & (counts[pix.clamp_min(0)] > 1)
    width = line if line is not None else max(1, round(min(h / rows, w / cols) / 10))
    outline = merged & _edges(pix, width)
    colour = PALETTE[pix.clamp_min(0) % len(PALETTE)].float() / 255.0
    out = torch.where(outline[..., None], colour, out)
    return (out * 255.0).round().to(torch.uint8)


def _edges(pix: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` of a pixel of another slot, or of the image border."""
    edge = torch.zeros_like(pix, dtype=torch.bool)
    edge[:width] = edge[-width:] = True
    edge[:, :width] = edge[:, -width:] = True
    for s in range(1, width + 1):
        edge[s:] |= pix[s:] != pix[:-s]
        edge[:-s] |= pix[:-s] != pix[s:]
        edge[:, s:] |= pix[:, s:] != pix[:, :-s]
        edge[:, :-s] |= pix[:, :-s] != pix[:, s:]
    return edge


@torch.no_grad()
def token_groups(model: nn.Module, *args: Any, stream: str = "image",
                 **kwargs: Any) -> torch.Tensor:
    """Run one forward of the trimmed ``model`` on ``args``/``kwargs`` in eval mode, with
    source tracking on for that forward, and return ``B×rows×cols``: for each patch of
    ``stream``, the slot of the token covering it at the end of the forward, ``-1`` where
    it was dropped (`draw` paints it). The model's mode and tracking are restored after."""
    applied = api._applied(model)  # raises for a model with nothing applied
    desc = applied.description.streams.get(stream)
    if desc is None:
        raise ValueError(f"this model has no stream {stream!r}; its streams are "
                         f"{sorted(applied.description.streams)}")
    if desc.grid is None:
        raise ValueError(f"stream {stream!r} states no patch grid (its adapter does not, or "
                         f"its input size is dynamic); set StreamDesc.grid in the adapter")
    ctx = applied.ctx
    was_training, was_tracking = model.training, ctx.track_source
    ctx.track_source = True
    model.eval()
    try:
        model(*args, **kwargs)
        state = ctx.states.get(stream)
    finally:
        ctx.track_source = was_tracking
        model.train(was_training)
    if state is None or state.source is None:
        raise ValueError(f"the forward did not run stream {stream!r} through a trimmed layer")
    return patch_groups(state.source, desc.grid)
