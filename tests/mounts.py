"""Real filesystems for failure tests: a tmpfs of a given size or mode (root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs at ``path`` (root only); skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (full and read-only disks are simulated by nothing else)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"rtsed-test-{uuid.uuid4().hex[:8]}", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
