"""benchmarks.teach_heldout's split: new classes only from ESC-50 fold-4 categories the bundled
recipe never heard, and held-out clips whose recordings teach never gets."""

from __future__ import annotations

import pytest

from benchmarks.teach_heldout import new_class_clips


def test_split_by_recording_and_unheard_categories(shared_data):
    split = new_class_clips(shared_data, ["siren", "glass_breaking"], test_clips=2, seed=0)
    for label, (teach, test) in split.items():
        assert len(test) >= 2 and len(teach) >= 5, (label, len(teach), len(test))
        assert {c.label for c in teach + test} == {label}
        # clips cut from one recording (e.g. 4-90014-A and -B) stay on one side
        assert not {c.recording_id for c in teach} & {c.recording_id for c in test}
    assert split == new_class_clips(shared_data, ["siren", "glass_breaking"], test_clips=2, seed=0)
    with pytest.raises(SystemExit, match="heard it in training.*siren"):
        new_class_clips(shared_data, ["door_wood_knock"], test_clips=2, seed=0)  # a training distractor
