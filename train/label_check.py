"""The class list a data set implies, checked before training: a typo or a split mismatch in the
annotations would otherwise become a class of its own without a word.

- A label with events in validation or test but none in training is refused: the model cannot
  learn a class it never hears, and its scores would be judged on it (usually a typo, or a
  class missing from the training split).
- A label with fewer than ``RARE_EVENTS`` training events, or one that differs from another
  label only by case or separators, earns a warning naming the closest other label (difflib):
  ``dgo`` beside ``dog`` is far more often a typo than a class.

Labels listed in ``--labels`` are the user's stated intent: neither refused nor warned about as
typos (a listed label without training events still gets a one-line warning).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence

from train.datasets import DatasetError, SedDataset

RARE_EVENTS = 3


class LabelError(DatasetError):
    """Labels that would become classes the model cannot learn; the message names each and the fix."""


def _norm(label: str) -> str:
    return re.sub(r"[\W_]+", "", label.casefold())


def _closest(label: str, others: Sequence[str]) -> str:
    match = difflib.get_close_matches(label, [o for o in others if o != label], n=1, cutoff=0.6)
    same = [o for o in others if o != label and _norm(o) == _norm(label)]
    best = same[0] if same else match[0] if match else None
    return f"; closest known label: {best!r}" if best else ""


def check_labels(dataset: SedDataset, explicit: Sequence[str] | None = None) -> list[str]:
    """One-line warnings about ``dataset.labels``; LabelError for labels found only outside the
    training split. ``explicit``: the labels the user listed (``--labels``)."""
    listed = set(explicit or ())
    counts = {split: Counter(e.event_label for item in dataset.items if item.split == split for e in item.events)
              for split in dataset.splits}
    train = counts.get("train", Counter())
    elsewhere = {label: {s: c[label] for s, c in counts.items() if s != "train" and c[label]}
                 for label in dataset.labels}
    known = [label for label in dataset.labels if train[label]]

    refused = [label for label in dataset.labels if not train[label] and elsewhere[label] and label not in listed]
    if refused:
        lines = [f"{label!r} ({', '.join(f'{s}: {n} events' for s, n in elsewhere[label].items())}"
                 f"{_closest(label, known)})" for label in refused]
        raise LabelError(
            "labels found only in validation/test, never in training: " + "; ".join(lines)
            + ". The model cannot learn a class it never hears: fix the label if it is a typo, add training "
            "examples, or list every class in --labels to keep it anyway")

    warnings = []
    for label in dataset.labels:
        n = train[label]
        if label in listed:
            if not n:
                warnings.append(f"label {label!r} is listed in --labels but has no training events: its output "
                                "will stay untrained")
            continue
        twins = [o for o in dataset.labels if o != label and _norm(o) == _norm(label)]
        if n < RARE_EVENTS or twins:
            what = f"only {n} training event{'s' if n != 1 else ''}" if n < RARE_EVENTS else \
                f"{n} training events, and it differs from {twins[0]!r} only by case or separators"
            warnings.append(f"label {label!r} has {what}{_closest(label, known)}: a typo in the annotations? "
                            "Fix it, or list the classes in --labels to silence this")
    return warnings
