"""BatchNorm bookkeeping for code paths that compute BatchNorm themselves (fused kernels, CPU
fast paths): what ``nn.BatchNorm2d.forward`` decides before calling ``F.batch_norm``, and its
running-statistics update, so that every path leaves a module in exactly the state torch would.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bn_arguments(bn: torch.nn.BatchNorm2d) -> dict:
    """What ``nn.BatchNorm2d.forward`` would pass to ``F.batch_norm`` (and its bookkeeping): the
    running statistics (None when not tracked in training), whether batch statistics are used,
    and the exponential-average factor (momentum None: cumulative average over num_batches_tracked,
    which is incremented here in training exactly as the module does)."""
    # Each parameter and buffer read once: a module's attribute lookup is slow next to a
    # streaming step, and this runs once per BatchNorm per step.
    training, momentum = bn.training, bn.momentum
    running_mean, running_var = bn.running_mean, bn.running_var
    factor = 0.0 if momentum is None else momentum
    if training and bn.track_running_stats:
        tracked = bn.num_batches_tracked
        if tracked is not None:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if momentum is None else momentum
    use_batch = training or (running_mean is None and running_var is None)
    track = not training or bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias,
                bn_running_mean=running_mean if track else None,
                bn_running_var=running_var if track else None,
                training=use_batch, momentum=factor, eps=bn.eps)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                         var_biased: Tensor, n: int, momentum: float) -> None:
    """torch's update from one batch of n values per channel: r = (1 - momentum) r + momentum *
    batch, with the unbiased variance. No-op without running statistics."""
    if running_mean is None:
        return
    unbiased = var_biased * (n / max(n - 1, 1))
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def mean_var_from_sums(total: Tensor, squares: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per-channel float64 sums of x and x^2 over n values -> (mean, biased variance), float64.
    Sums accumulated in float64 keep E[x^2] - E[x]^2 accurate for activations whose mean is
    not many orders of magnitude above their spread (true of post-ReLU/LeakyReLU features)."""
    mean = total / n
    return mean, (squares / n - mean * mean).clamp_min(0)
