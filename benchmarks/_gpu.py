"""Shared GPU-benchmark helpers (imported only by the CUDA benchmark files)."""

from __future__ import annotations

import torch


class TF32:
    """Set TF32 for cuDNN convs and matmuls (both sides of a comparison), restore on exit."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
