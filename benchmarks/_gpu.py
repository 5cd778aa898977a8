"""Shared GPU-benchmark helpers (imported only by the CUDA benchmark files)."""

from __future__ import annotations

import contextlib
import gc

import pytest
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


OOM_SKIPS: list[tuple[str, str]] = []  # (test id, why) of every case skipped for want of memory


@contextlib.contextmanager
def skip_on_oom(test_id: str):
    """Turn an out-of-memory error inside the block into a skip of the case that names what did not
    fit, recorded in OOM_SKIPS (the session summary lists them); the GPU's cached memory is released
    first so that the next case starts clean. Every GPU benchmark runs inside it (conftest.py)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "out of memory"
        del exc  # its traceback holds the frames, and with them the case's tensors
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        OOM_SKIPS.append((test_id, why))
        pytest.skip(f"out of GPU memory: {why}")
