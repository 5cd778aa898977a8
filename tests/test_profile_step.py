"""benchmarks.profile_step attributes a real step's operator time to the model's pieces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_profile_step():
    """benchmarks/profile_step.py under a private name (tests/ does not put the repository on sys.path)."""
    spec = importlib.util.spec_from_file_location("rtsed_profile_step", REPO / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


profile_step = _load_profile_step()


@pytest.mark.parametrize("offline", [False, True])
def test_profile_attributes_every_piece(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("RTSED_ALLOCATOR", "system")  # no re-exec inside pytest
    out = tmp_path / "profile.md"
    profile_step.main(["--batch", "2", "--frames", "48", "--markdown", str(out)] + (["--offline"] if offline else []))
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "piece" not in line]
    pieces = {row[0].strip(): row for row in rows}
    for block in (1, 2, 3):
        assert f"block {block}: pointwise 1x1 conv" in pieces
    head = pieces["head: f_dil + BN + classifier (fast_head)"]
    assert float(head[1]) > 0 and float(head[3]) > 0  # measured time and a compute floor
    shares = sum(float(row[2].strip().rstrip("%")) for row in rows)
    assert 95 <= shares <= 105  # every operator landed in exactly one piece
    assert "Each part alone" in text and "block 1" in text
