"""``python -m train.fit`` that is SIGKILLed at a chosen point, for the resume tests
(tests/test_fit.py, tests/test_onthefly.py).

    python tests/fit_killed.py N <train.fit arguments>           killed in optimiser step N + 1
    python tests/fit_killed.py --in-save N <train.fit arguments>  stops halfway through last.pt write N + 1

Runs train.fit in this process. The first form sends itself SIGKILL right after the update of
optimiser step N + 1 (counted over the whole run): no clean-up, no further save, as when a kill
lands between a step and the next last.pt write; with ``--save-every-s 0`` last.pt then holds the
state after step N and ``--resume`` must redo the lost update.

The second form lets the first N writes of last.pt through; in write N + 1 it puts the first half
of the serialised state into the temporary file that atomic_torch_save renames over last.pt once
complete, flushes it to disk and waits. The test sees that half-written temporary file and kills
the process with SIGKILL from outside: the kill lands during a checkpoint save, every time.

The hooks live here, not in train.fit, so the product carries no test switch.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import torch

import train.fit as fit


def kill_after_step(steps_before_the_kill: int) -> None:
    original = fit.train_step
    calls = 0

    def train_step_then_die(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = original(*args, **kwargs)
        if calls > steps_before_the_kill:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    fit.train_step = train_step_then_die  # run() looks train_step up in the module at call time


def hang_in_save(writes_before_the_kill: int) -> None:
    original = torch.save
    writes = 0

    def save_then_hang_halfway(obj, f, *args, **kwargs):
        nonlocal writes
        if not (isinstance(obj, dict) and obj.get("format") == "rtsed-train-state"):
            return original(obj, f, *args, **kwargs)  # best.pt and anything else: untouched
        writes += 1
        if writes <= writes_before_the_kill:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"fit_killed: last.pt write {writes} half done ({len(data) // 2} of {len(data)} bytes), "
              "waiting for SIGKILL", flush=True)
        time.sleep(600)  # the test's SIGKILL ends this; a test that forgot to kill fails on its timeout
        os._exit(3)

    torch.save = save_then_hang_halfway  # atomic_torch_save looks torch.save up at call time


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--in-save":
        hang_in_save(int(args[1]))
        args = args[2:]
    else:
        kill_after_step(int(args[0]))
        args = args[1:]
    fit.main(args)


if __name__ == "__main__":
    main()
