"""rtsed.backends.allocator: the re-exec that preloads a caching allocator, and what it sets."""

from __future__ import annotations

import sys

import pytest

from rtsed.backends import allocator


@pytest.mark.parametrize("name, variable, value", [
    ("tcmalloc", "TCMALLOC_RELEASE_RATE", "0"),
    ("jemalloc", "MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),
])
def test_reexec_preloads_and_keeps_freed_pages(monkeypatch, name, variable, value):
    """The re-exec puts the library first in LD_PRELOAD and tells it never to hand freed pages
    back to the OS (otherwise big tensors page-fault in again); a user's own setting wins."""
    captured = {}

    def fake_execve(path, argv, env):
        captured.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "glibc malloc")
    monkeypatch.setattr(allocator, "find_allocator", lambda n: f"/lib/lib{n}.so" if n == name else None)
    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setenv("RTSED_ALLOCATOR", name)
    monkeypatch.setenv("LD_PRELOAD", "/lib/other.so")
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("RTSED_ALLOCATOR_REEXEC", raising=False)
    with pytest.raises(SystemExit):
        allocator.ensure_caching_allocator()
    env = captured["env"]
    assert env["LD_PRELOAD"] == f"/lib/lib{name}.so:/lib/other.so"
    assert env[variable] == value
    assert env["RTSED_ALLOCATOR_REEXEC"] == "1"
    assert captured["path"] == sys.executable

    monkeypatch.setenv(variable, "user-choice")
    with pytest.raises(SystemExit):
        allocator.ensure_caching_allocator()
    assert captured["env"][variable] == "user-choice"


def test_missing_named_allocator_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "glibc malloc")
    monkeypatch.setattr(allocator, "find_allocator", lambda n: None)
    monkeypatch.setenv("RTSED_ALLOCATOR", "jemalloc")
    with pytest.raises(SystemExit, match="libjemalloc is not installed.*apt-get install"):
        allocator.ensure_caching_allocator()
