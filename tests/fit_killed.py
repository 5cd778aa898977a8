"""``python -m train.fit`` that dies like a killed job, for tests/test_fit.py's resume test.

    python tests/fit_killed.py N <train.fit arguments>

Runs train.fit in this process and, in optimiser step N + 1 (counted over the whole run), ends
the process with ``os._exit(137)`` right after that step's update: no clean-up, no further save,
as when SIGKILL lands between a step and the next last.pt write. With ``--save-every-s 0``
last.pt then holds the state after step N, and the update of step N + 1 is lost: ``--resume``
must redo it. The hook lives here, not in train.fit, so the product carries no test switch.
"""

from __future__ import annotations

import os
import sys

import train.fit as fit


def main() -> None:
    stop_after = int(sys.argv[1])
    original = fit.train_step
    calls = 0

    def train_step_then_die(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = original(*args, **kwargs)
        if calls > stop_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(137)
        return loss

    fit.train_step = train_step_then_die  # run() looks train_step up in the module at call time
    fit.main(sys.argv[2:])


if __name__ == "__main__":
    main()
