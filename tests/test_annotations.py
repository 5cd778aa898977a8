"""Event lists: DCASE TSV and TUT-SED 2016 I/O, validation messages, frame targets."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtsed.config import TUT_SED_2016_LABELS
from train.annotations import (
    AnnotationError,
    Event,
    event_cells,
    events_to_frame_targets,
    read_dcase_tsv,
    read_dcase_tsv_by_file,
    read_tut_annotation,
    write_dcase_tsv,
)

HEADER = "filename\tonset\toffset\tevent_label\n"


def test_dcase_round_trip_keeps_events_and_empty_files(tmp_path):
    events = [Event("b.wav", 1.5, 2.25, "dog"), Event("a.wav", 0.0, 0.02, "rain"), Event("a.wav", 0.5, 3.0, "dog")]
    path = tmp_path / "ann.tsv"
    write_dcase_tsv(path, events, files_without_events=["silent_scene.wav", "a.wav"])
    by_file = read_dcase_tsv_by_file(path)
    assert by_file == {
        "a.wav": [Event("a.wav", 0.0, 0.02, "rain"), Event("a.wav", 0.5, 3.0, "dog")],
        "b.wav": [Event("b.wav", 1.5, 2.25, "dog")],
        "silent_scene.wav": [],
    }
    assert sorted(read_dcase_tsv(path), key=repr) == sorted(events, key=repr)
    first = path.read_bytes()
    write_dcase_tsv(path, list(reversed(events)), ["silent_scene.wav"])
    assert path.read_bytes() == first  # sorted output: same events, same bytes


def test_dcase_extra_columns_and_column_order(tmp_path):
    path = tmp_path / "det.tsv"
    path.write_text("event_label\tfilename\tscore\tonset\toffset\ndog\tx.wav\t0.9\t0.1\t0.4\n\n")
    assert read_dcase_tsv(path) == [Event("x.wav", 0.1, 0.4, "dog")]


@pytest.mark.parametrize(
    "row, message",
    [
        ("x.wav\t2.0\t1.0\tdog", r"ann\.tsv, line 2: offset 1\.0 s is not after onset 2\.0 s"),
        ("x.wav\t1.0\t1.0\tdog", r"line 2: offset 1\.0 s is not after onset"),
        ("x.wav\t-0.5\t1.0\tdog", r"line 2: negative onset"),
        ("x.wav\tabc\t1.0\tdog", r"line 2: onset 'abc' is not a number"),
        ("x.wav\t0.5\t\tdog", r"line 2: onset, offset and event_label must all be given"),
        ("x.wav 0.5 1.0 dog", r"line 2: expected 4 tab-separated fields"),
        ("x.wav\t0.5\t1.0\tcat", r"line 2: unknown label 'cat'; known labels are \['dog', 'rain'\]"),
        ("x.wav\t12.0\t13.0\tdog", r"line 2: onset 12\.0 s of 'dog' lies beyond the end of 'x\.wav' \(10\.000 s"),
    ],
)
def test_dcase_errors_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "ann.tsv"
    path.write_text(HEADER + row + "\n")
    with pytest.raises(AnnotationError, match=message):
        read_dcase_tsv(path, labels=["dog", "rain"], durations_s={"x.wav": 10.0})


def test_dcase_header_required(tmp_path):
    path = tmp_path / "ann.tsv"
    path.write_text("x.wav\t0.1\t0.2\tdog\n")
    with pytest.raises(AnnotationError, match=r"ann\.tsv, line 1: header .* lacks column"):
        read_dcase_tsv(path)
    path.write_text("")
    with pytest.raises(AnnotationError, match="empty file"):
        read_dcase_tsv(path)
    with pytest.raises(AnnotationError, match="cannot read"):
        read_dcase_tsv(tmp_path / "missing.tsv")


def test_dcase_duration_check_needs_the_file(tmp_path):
    path = tmp_path / "ann.tsv"
    path.write_text(HEADER + "y.wav\t0.1\t0.2\tdog\n")
    with pytest.raises(AnnotationError, match="no audio file 'y.wav'"):
        read_dcase_tsv(path, durations_s={"x.wav": 1.0})


def test_tut_annotation_reads_whitespace_separated_lines(tmp_path):
    path = tmp_path / "TUT-SED-synthetic-2016-annot-1.txt"
    path.write_text("0.5\t2.75\tbus\n\n3.0   4.0 gun_shot\n")
    events = read_tut_annotation(path, "mix-1.wav", TUT_SED_2016_LABELS, duration_s=10.0)
    assert events == [Event("mix-1.wav", 0.5, 2.75, "bus"), Event("mix-1.wav", 3.0, 4.0, "gun_shot")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.5 2.0\n", r"annot\.txt, line 1: expected 'onset_s offset_s label'"),
        ("0.5 2.0 crowd applause\n", r"line 1: expected .* got 4"),
        ("1.0 0.5 bus\n", r"line 1: offset 0\.5 s is not after onset 1\.0 s"),
        ("bus 0.5 1.0\n", r"line 1: onset 'bus' is not a number"),
        ("0.1 0.2 bus\n0.5 1.0 buss\n", r"line 2: unknown label 'buss'; known labels are \['alarms_and_sirens'"),
        ("20.0 21.0 bus\n", r"line 1: onset 20\.0 s of 'bus' lies beyond the end"),
        ("1.0 12.0 bus\n", r"line 1: offset 12\.0 s of 'bus' lies beyond the end"),
    ],
)
def test_tut_annotation_errors(tmp_path, text, message):
    path = tmp_path / "annot.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_tut_annotation(path, "mix.wav", TUT_SED_2016_LABELS, duration_s=10.0, offset_tolerance_s=1.0)


def test_frame_targets_exact_boundaries():
    # 0.06 / 0.02 and 0.1 / 0.02 are not exact in binary floating point.
    targets = events_to_frame_targets([Event("f", 0.06, 0.1, "b")], 8, 0.02, ["a", "b"])
    assert targets.dtype == np.float32 and targets.shape == (8, 2)
    assert targets[:, 1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert not targets[:, 0].any()
    # Inside one cell, straddling a boundary, past the end.
    assert event_cells(0.061, 0.062, 0.02) == (3, 4)
    assert event_cells(0.059, 0.061, 0.02) == (2, 4)
    late = events_to_frame_targets([Event("f", 0.1, 10.0, "a")], 8, 0.02, ["a", "b"])
    assert late[:, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(AnnotationError, match=r"unknown label 'c'"):
        events_to_frame_targets([Event("f", 0.0, 1.0, "c")], 8, 0.02, ["a", "b"])


@settings(max_examples=200, deadline=None)
@given(
    onset_us=st.integers(0, 3_000_000),
    length_us=st.integers(1, 2_000_000),
    hop_us=st.sampled_from([10_000, 20_000, 23_219]),
)
def test_frame_targets_match_exact_overlap(onset_us, length_us, hop_us):
    """Cell t is active iff [t*hop, (t+1)*hop) and [onset, offset) overlap (exact rationals)."""
    onset, offset, hop = Fraction(onset_us, 10**6), Fraction(onset_us + length_us, 10**6), Fraction(hop_us, 10**6)
    n_frames = 300
    got = events_to_frame_targets([Event("f", float(onset), float(offset), "x")], n_frames, float(hop), ["x"])[:, 0]
    want = [float(t * hop < offset and onset < (t + 1) * hop) for t in range(n_frames)]
    assert got.tolist() == want
