"""Atomic writes (kdir.utils.io): complete or untouched, never half written, no temporary file left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdir.utils import atomic_write, save_json, save_npy, save_text
from kdir.utils.io import stage_file, temp_path


def test_atomic_write_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "run.trec"
    with atomic_write(path) as f:
        f.write("first\n")
    assert path.read_text() == "first\n"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(path) as f:
            f.write("second, half")
            raise RuntimeError("midway")
    assert path.read_text() == "first\n"
    assert [p.name for p in path.parent.iterdir()] == ["run.trec"]


def test_temp_names_are_hidden_unique_and_in_the_same_folder(tmp_path):
    names = {temp_path(tmp_path / "a.json") for _ in range(50)}
    assert len(names) == 50
    assert all(p.parent == tmp_path and p.name.startswith(".a.json.") and p.suffix == ".tmp" for p in names)


def test_json_text_and_npy_helpers_round_trip(tmp_path):
    assert json.loads(save_json({"a": [1, 2]}, tmp_path / "m.json").read_text()) == {"a": [1, 2]}
    assert save_text("x\ny\n", tmp_path / "t.txt").read_text() == "x\ny\n"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(np.load(save_npy(arr, tmp_path / "a.npy")), arr)
    with pytest.raises(ValueError):  # object arrays would need pickles
        save_npy(np.array([{"x": 1}], dtype=object), tmp_path / "o.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "m.json", "t.txt"]


def test_stage_file_keeps_the_temporary_file_for_the_caller_to_publish(tmp_path):
    tmp = stage_file(tmp_path / "seg.keys.npy", lambda f: np.save(f, np.arange(3)))
    assert tmp.is_file() and tmp.parent == tmp_path and not (tmp_path / "seg.keys.npy").exists()
    with pytest.raises(ZeroDivisionError):
        stage_file(tmp_path / "seg.values.npy", lambda f: 1 / 0)
    assert list(tmp_path.iterdir()) == [tmp]
