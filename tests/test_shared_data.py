"""Where the tests that need the shared clip data find it (conftest.find_shared_data): a set
RTSED_SHARED_DATA that holds no data fails the test instead of skipping it; unset, the data beside
the checkout is used when present and the test skips with the reason when not."""

from __future__ import annotations

import pytest

import conftest
from conftest import SHARED_DATA_ENV, find_shared_data


def _data_root(tmp_path):
    root = tmp_path / "data"
    (root / "esc10").mkdir(parents=True)
    (root / "esc10" / "meta.csv").write_text("filename,class,fold\n")
    return root


def test_a_set_variable_names_the_root(tmp_path, monkeypatch):
    root = _data_root(tmp_path)
    monkeypatch.setenv(SHARED_DATA_ENV, str(root))
    assert find_shared_data() == root


def test_a_set_variable_without_the_data_fails_instead_of_skipping(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(pytest.fail.Exception, match=r"is set but .*esc10/meta.csv does not exist.*or unset it"):
        find_shared_data()


def test_unset_uses_the_data_beside_the_checkout_or_skips(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    monkeypatch.setattr(conftest, "DEFAULT_SHARED_DATA", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match=f"absent and {SHARED_DATA_ENV} is unset"):
        find_shared_data()
    monkeypatch.setattr(conftest, "DEFAULT_SHARED_DATA", _data_root(tmp_path))
    assert find_shared_data() == tmp_path / "data"
