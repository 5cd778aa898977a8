"""Folded weights for the eval-mode fast paths, as functions of tensors: BatchNorm as a
per-channel affine, and a cache of folds keyed on the tensors they are folded from.

A streaming step at one frame is short enough that re-folding BN into the weights each call (a
256 x 256 product per block) would be a large share of it, so folds are cached. The cache is a
plain dict the caller owns (a layer passes its own, rtsed.models.layers.fold_cache), so the
ops stay functions of tensors while their folds stay cached across calls.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def cached_fold(cache: dict | None, name: str, sources: list[Tensor], compute: Callable):
    """``compute()`` (folded weights), cached in ``cache[name]`` while its sources are unchanged.

    The key is each source's storage and in-place version counter, so loading a checkpoint or
    an optimizer step invalidates it. Not cached while autograd records through the sources
    (gradients must then flow through the folding), nor without a cache."""
    if cache is None or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
        return compute()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    # Folded in full precision whatever autocast is on (--precision bf16 inference would fold
    # products such as W @ shift in bf16, and the cache would keep them for fp32 calls too).
    with torch.autocast("cpu", enabled=False):
        value = compute()
    cache[name] = (key, value)
    return value


def bn_affine(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
              eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as a per-channel affine y = scale * x + shift (running statistics)."""
    scale = weight / torch.sqrt(running_var + eps)
    return scale, bias - running_mean * scale
