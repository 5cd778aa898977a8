"""Kernel modules imported under Triton's interpreter, for the tests that run kernels on CPU tensors
(tests/test_kernel_dilated.py, tests/test_kernel_dws.py, tests/test_kernel_step_logits.py).

The @triton.jit decorators read TRITON_INTERPRET when a kernel module is imported, and triton.language's
own @jit helpers read it when triton itself is first imported, so the variable must be set before
either import. It is set for those imports only: the rest of the session (RTSED_KERNELS=auto on CPU)
must not see it. This module therefore imports neither triton nor a kernel module at its top.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest


def _holds_stale(module: ModuleType, earlier: list[ModuleType]) -> bool:
    """Whether `module` still holds a function it took from an earlier module (`from kernels.x import
    f`) that a reload of that module has since replaced: its launchers would call the old kernels."""
    defined_in = {dep.__name__: dep for dep in earlier}
    for name, value in vars(module).items():
        # A @triton.jit function wraps the Python function it was made from (.fn), which names its module.
        origin = getattr(getattr(value, "fn", value), "__module__", None)
        if callable(value) and origin in defined_in and getattr(defined_in[origin], name, None) is not value:
            return True
    return False


def import_interpreted(*names: str) -> tuple[ModuleType, ...]:
    """The modules `names` (e.g. "kernels.dilated_temporal"), imported with TRITON_INTERPRET=1 and
    returned in that order; name them in dependency order (a module after those it imports from).

    Skips the calling test module when triton is not installed. A module imported earlier in this
    process without the interpreter (its `_INTERPRETED` is false), or one that still holds functions
    of a module reloaded since, is reloaded, so that its kernels run interpreted on CPU tensors."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        modules: list[ModuleType] = []
        for name in names:
            already = name in sys.modules
            module = importlib.import_module(name)
            if already and (not module._INTERPRETED or _holds_stale(module, modules)):
                module = importlib.reload(module)
            modules.append(module)
        return tuple(modules)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
