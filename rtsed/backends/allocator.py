"""A caching memory allocator for big-tensor work (training, offline batches).

Under glibc malloc every tensor above 32 MiB is a fresh mmap whose pages fault in on first
touch: a training step that allocates tens of GB spends most of its time there (docs/fast-paths.md).
The allocator must be loaded before the interpreter starts, so ``ensure_caching_allocator``
re-executes the current command once with LD_PRELOAD set.

RTSED_ALLOCATOR: ``auto`` (default: tcmalloc, else jemalloc, else glibc with a warning),
``tcmalloc``, ``jemalloc`` (an error when missing), or ``system`` (leave malloc alone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_CANDIDATES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# Both allocators return freed pages to the OS by default (jemalloc after a delay, tcmalloc
# gradually); never, here, like a cache.
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_REEXEC_FLAG = "RTSED_ALLOCATOR_REEXEC"
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or set RTSED_ALLOCATOR=system to silence this"


def loaded_allocator() -> str:
    """'tcmalloc', 'jemalloc' or 'glibc malloc': what this process runs with (from its maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc malloc"


def find_allocator(name: str) -> str | None:
    for lib in _CANDIDATES[name]:
        for folder in _LIB_DIRS:
            path = Path(folder) / lib
            if path.exists():
                return str(path)
    return None


def ensure_caching_allocator() -> str:
    """Make sure a caching allocator is loaded, re-executing this command once if needed.
    Returns the allocator in use. Call it first thing in a command's main()."""
    choice = os.environ.get("RTSED_ALLOCATOR", "auto").strip().lower()
    if choice not in ("auto", "tcmalloc", "jemalloc", "system"):
        raise SystemExit(f"RTSED_ALLOCATOR={choice!r}: use auto, tcmalloc, jemalloc or system")
    current = loaded_allocator()
    if choice == "system" or current in ("tcmalloc", "jemalloc") or not sys.platform.startswith("linux"):
        return current
    names = ["tcmalloc", "jemalloc"] if choice == "auto" else [choice]
    found = next(((n, p) for n in names if (p := find_allocator(n))), None)
    if found is None:
        if choice != "auto":
            raise SystemExit(f"RTSED_ALLOCATOR={choice} but lib{choice} is not installed: {INSTALL_HINT}")
        print(f"rtsed: no caching allocator found; big-tensor work runs up to 3x slower under glibc "
              f"malloc. Install one: {INSTALL_HINT}", file=sys.stderr)
        return current
    if os.environ.get(_REEXEC_FLAG):
        return current  # re-executed once already and still not loaded: do not loop
    name, path = found
    env = dict(os.environ, **{_REEXEC_FLAG: "1"})
    env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD", "")]))
    if name == "jemalloc":
        env.setdefault("MALLOC_CONF", _JEMALLOC_CONF)
    else:
        # tcmalloc hands freed spans back to the OS over time by default; a training step then
        # page-faults them in again now and then. Rate 0 keeps them, as a cache should.
        env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return name  # not reached
