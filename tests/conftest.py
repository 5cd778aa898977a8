"""Fixtures the native-kernel tests share (tests/test_native_*.py)."""

from __future__ import annotations

import pytest
import torch

from rtsed.backends import native


@pytest.fixture
def native_on(monkeypatch):
    """RTSED_NATIVE on for this test; skipped where the kernels cannot be built."""
    monkeypatch.setenv("RTSED_NATIVE", "1")
    if not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
