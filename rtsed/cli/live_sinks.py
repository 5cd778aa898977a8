"""Where ``rtsed.live``'s events go: JSONL as they happen, a DCASE TSV and Audacity labels kept current.

Each output stands on its own: one that fails (a full disk, a read-only folder, a reader that
closed its pipe) is reported the moment it fails and the others go on. The TSV and the Audacity
file are rewritten atomically (rtsed.atomic: temporary file + rename) at most every
``save_interval_s`` while events arrive, and once more at the end, so a killed session leaves
them whole and at most a second behind, never cut mid-line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, TextIO

from rtsed.atomic import OutputError, check_writable, write_atomically
from rtsed.serve.decode import OnsetNotice, SoundEvent, event_to_json, write_audacity_labels, write_dcase_tsv


def _to_stderr(message: str) -> None:
    print(f"rtsed.live: {message}", file=sys.stderr)


class EventSinks:
    """The session's outputs. ``emit`` each onset notice and event; ``tick`` often (it saves the
    files when due); ``close`` at the end -> whether every output was written.

    ``failed`` maps each output that failed ("jsonl", "tsv", "audacity") to its last error;
    ``report`` receives each error message when it happens (the terminal view's console, or
    stderr)."""

    def __init__(self, jsonl: str | None, tsv: str | None, audacity: str | None, stream_name: str,
                 report: Callable[[str], None] = _to_stderr, save_interval_s: float = 1.0):
        self.tsv, self.audacity, self.stream_name = tsv, audacity, stream_name
        self.report = report
        self.save_interval_s = save_interval_s
        self.jsonl_path = jsonl
        self.jsonl: TextIO | None = None
        if jsonl == "-":
            self.jsonl = sys.stdout
        elif jsonl:
            try:
                self.jsonl = open(jsonl, "a", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"--jsonl {jsonl}: cannot open it for appending ({exc.strerror or exc}): "
                                  "choose a writable path") from None
        self.events: list[SoundEvent] = []
        self.recent: deque[str] = deque(maxlen=8)
        self.failed: dict[str, str] = {}
        self._saved_events = 0
        self._last_save = time.monotonic()

    @staticmethod
    def check(jsonl: str | None, tsv: str | None, audacity: str | None) -> None:
        """OutputError naming the path and the fix when an output cannot be written at all (a
        missing or read-only folder): found before the audio device opens."""
        for flag, path in (("--jsonl", None if jsonl == "-" else jsonl), ("--tsv", tsv), ("--audacity", audacity)):
            if not path:
                continue
            if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
                # A device or a named pipe takes writes as it is (no file is created beside it).
                if not os.access(path, os.W_OK):
                    raise OutputError(f"{flag} {path}: permission denied: choose a path you may write to")
                continue
            check_writable(path, flag)

    def begin(self, session: dict) -> None:
        """Start the JSONL with a ``{"type": "session", ...}`` line (start time, model, devices,
        rates): appends from several sessions to one file stay separable, and each session's
        ``onset_s`` values count from its own start."""
        self._write_jsonl({"type": "session", **session})

    def emit(self, item: OnsetNotice | SoundEvent) -> None:
        if isinstance(item, SoundEvent):
            self.events.append(item)
            self.recent.appendleft(f"{item.onset_s:8.2f}-{item.offset_s:8.2f} s  {item.label}  ({item.score:.2f})")
        self._write_jsonl(event_to_json(item))

    def _write_jsonl(self, line: dict) -> None:
        if self.jsonl is None:
            return
        try:
            self.jsonl.write(json.dumps(line) + "\n")
            self.jsonl.flush()
        except BrokenPipeError:
            # The consumer went away (e.g. `| head`): stop writing JSONL, keep detecting so
            # the TSV/Audacity files still get every event.
            self.report("JSONL reader closed the pipe; JSONL output stopped, the other outputs go on")
            self.jsonl = None
        except OSError as exc:
            self._fail("jsonl", f"--jsonl {self.jsonl_path}: writing failed ({exc.strerror or exc}); JSONL output "
                                "stopped, the other outputs go on")
            self._discard_jsonl()

    def tick(self, now: float | None = None) -> None:
        """Save the TSV/Audacity files when new events wait and save_interval_s has passed."""
        now = time.monotonic() if now is None else now
        if len(self.events) > self._saved_events and now - self._last_save >= self.save_interval_s:
            self.save()

    def save(self) -> None:
        """Rewrite the TSV and the Audacity file (each atomically, each on its own)."""
        self._last_save = time.monotonic()
        self._saved_events = len(self.events)
        events = list(self.events)
        if self.tsv:
            self._write("tsv", "--tsv", self.tsv,
                        lambda f: write_dcase_tsv(f, [(self.stream_name, e) for e in events]))
        if self.audacity:
            self._write("audacity", "--audacity", self.audacity, lambda f: write_audacity_labels(f, events))

    def close(self) -> bool:
        """Final save and close; whether every output holds every event. When the TSV could not
        be written its rows go to stdout instead (unless stdout carries the JSONL, which holds
        them already), so nothing is lost."""
        self.save()
        if "tsv" in self.failed:
            if self.jsonl is sys.stdout:
                self.report("the events are in the JSONL on stdout")
            else:
                self.report(f"the {len(self.events)} events follow on stdout as a DCASE TSV")
                try:
                    write_dcase_tsv(sys.stdout, [(self.stream_name, e) for e in self.events])
                    sys.stdout.flush()
                except OSError:
                    pass
        self._close_jsonl()
        return not self.failed

    def _write(self, key: str, flag: str, path: str, write) -> None:
        try:
            write_atomically(path, write, what=flag)
        except OutputError as exc:
            self._fail(key, str(exc))
            return
        if key in self.failed:
            self.report(f"{flag} {path} written again")
            del self.failed[key]

    def _fail(self, key: str, message: str) -> None:
        if self.failed.get(key) != message:  # each new problem once, as it happens
            self.report(message)
        self.failed[key] = message

    def _discard_jsonl(self) -> None:
        """Stop the JSONL output after a failed write: the line that failed stays unwritten (a
        close would only retry it and fail again)."""
        jsonl, self.jsonl = self.jsonl, None
        if jsonl is not None and jsonl is not sys.stdout:
            try:
                jsonl.close()
            except OSError:
                pass

    def _close_jsonl(self) -> None:
        jsonl, self.jsonl = self.jsonl, None
        try:
            if jsonl is sys.stdout:
                jsonl.flush()
            elif jsonl is not None:
                jsonl.close()
        except OSError as exc:
            if not isinstance(exc, BrokenPipeError):
                self._fail("jsonl", f"--jsonl {self.jsonl_path}: writing failed at close "
                                    f"({exc.strerror or exc})")
