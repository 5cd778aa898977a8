"""Fixtures several test files share: the native-kernel switch (tests/test_native_*.py), the
interpreter's kernel-test settings (tests/test_kernel_*.py), the thread count, the engine tests'
checkpoint, and where the shared clip data lives (tests/test_bundled.py, tests/test_synth.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rtsed.backends import native

from engine_helpers import LABELS as ENGINE_LABELS, RATE as ENGINE_RATE, lively_checkpoint


@pytest.fixture
def native_on(monkeypatch):
    """RTSED_NATIVE on for this test; skipped where the kernels cannot be built."""
    monkeypatch.setenv("RTSED_NATIVE", "1")
    if not native.available():
        pytest.skip("native kernels unavailable (no C++ compiler)")


@pytest.fixture
def interpreter_no_tf32(monkeypatch):
    """TRITON_INTERPRET=1 for this test (rtsed.ops passes CPU tensors to a kernel only under it; the
    kernel modules must already be imported interpreted: tests/interpreted_kernels.py), and TF32 off
    in torch, as the parity rule asks, restored afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """In-process training with one thread, like train.fit's subprocesses in the tests (and as fast
    on shared cores); the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The engine tests' checkpoint (engine_helpers): a small dnd_3_10 with randomised weights and
    BN statistics, scaled so its probabilities cross the thresholds often (events to compare), saved
    as a real checkpoint. A test module that defines its own ``checkpoint`` uses that one instead."""
    return lively_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", "dnd_3_10", ENGINE_LABELS, seed=0,
                             rate=ENGINE_RATE)


SHARED_DATA_ENV = "RTSED_SHARED_DATA"
# ../shared/data beside the checkout: the layout of a development machine that holds the data.
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_shared_data(required: str = "esc10/meta.csv") -> Path:
    """The root of the shared clip data (esc10/, esc50-fold4/, ...; see its README).

    RTSED_SHARED_DATA names it. When that variable is set the data is expected: a root without
    `required` fails the test, so a CI run that was pointed at the data can never pass by skipping.
    When it is unset, ../shared/data beside the checkout is used if it holds `required`, and the
    test is skipped with the reason otherwise (a fresh clone on a machine without the data)."""
    named = os.environ.get(SHARED_DATA_ENV)
    if named:
        root = Path(named).expanduser()
        if not (root / required).is_file():
            pytest.fail(f"{SHARED_DATA_ENV}={named} is set but {root / required} does not exist: point "
                        f"{SHARED_DATA_ENV} at the folder that holds esc10/ and esc50-fold4/, or unset it "
                        f"to skip the tests that need the shared data", pytrace=False)
        return root
    if not (DEFAULT_SHARED_DATA / required).is_file():
        pytest.skip(f"shared data not found: {DEFAULT_SHARED_DATA / required} is absent and "
                    f"{SHARED_DATA_ENV} is unset (set it to the folder that holds esc10/)")
    return DEFAULT_SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """find_shared_data() as a fixture: the data root, or a skip / failure as it explains."""
    return find_shared_data()
