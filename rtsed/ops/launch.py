"""The Triton launchers of kernels/, loaded by name when dispatch answers ``triton`` (so that
nothing imports triton unless it runs). Each ``kernels/<op>.py`` exposes ``<op>(...)``, a
tensor-in, tensor-out launcher taking the tensors of the op of the same name in rtsed.ops (its
numbers too, less what the op does around the launch: ``dws_block``'s dropout and fold cache)."""

from __future__ import annotations

import importlib


def launcher(op: str):
    """``kernels.<op>.<op>``, looked up at each call (tests spy on it)."""
    return getattr(importlib.import_module(f"kernels.{op}"), op)
