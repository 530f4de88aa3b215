"""``python -m kdir.store``: info, verify, import, export and merge, run as commands, with their failure paths."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_command
from test_score_store import _splitmix_pair

from kdir.stores import ScoreStore, pair_keys_from_ids

SCORES = "q1\td1\t1.5\nq1\td2\t-0.25\nq2\td1\t3\nq2\td3\t0.1\nq1\td1\t2.5\n"  # (q1, d1) twice: the last line wins
VALUES = {("q1", "d1"): 2.5, ("q1", "d2"): -0.25, ("q2", "d1"): 3.0, ("q2", "d3"): 0.1}


def kstore(tmp_path: Path, *args: str) -> int:
    """Run ``python -m kdir.store <args>`` in this process; the run folder goes under ``tmp_path``."""
    return run_command("kdir.store", *args, f"hydra.run.dir={tmp_path / 'run'}")


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _lookup(store: Path, pairs) -> list[float]:
    qids, pids = zip(*pairs)
    return ScoreStore.open(store).lookup(pair_keys_from_ids(qids, pids)).tolist()


@pytest.fixture
def imported(tmp_path) -> Path:
    store = tmp_path / "t2.store"
    assert kstore(tmp_path, "import", f"store={store}", f"file={_file(tmp_path / 's.tsv', SCORES)}") == 0
    return store


# ---------------------------------------------------------------- import, info, verify


def test_import_then_info_and_the_printed_verify_command(tmp_path, capsys):
    store, scores = tmp_path / "t2.store", _file(tmp_path / "scores.tsv", SCORES)
    assert kstore(tmp_path, "import", f"store={store}", f"file={scores}", "teacher_name=T2") == 0
    assert f"imported 5 pairs (2 queries) from {scores} into {store}" in capsys.readouterr().out
    meta = ScoreStore.open(store).meta
    assert meta["teacher"] == {"name": "imported:T2"}
    assert meta["imported"]["file"] == str(scores.resolve()) and meta["imported"]["size"] == len(SCORES)
    assert _lookup(store, VALUES) == [np.float32(v) for v in VALUES.values()]

    assert kstore(tmp_path, "action=info", f"store={store}") == 0
    out = capsys.readouterr().out
    for line in [
        "teacher    imported:T2",
        "origin     imported",
        f"imported   {scores.resolve()} (pairs, {len(SCORES)} bytes), 5 pairs read",
        "pairs      4 in 1 segment (meta count 4)",
        "queries    2 (in the imported file)",
        "checksums  1 of 1 segments have checksum records",
    ]:
        assert line in out, out
    hint = shlex.split(re.search(r"re-hash them with: (.+)", out)[1])
    assert hint[:3] == ["python", "-m", "kdir.store"]
    assert kstore(tmp_path, *hint[3:]) == 0  # as printed
    out = capsys.readouterr().out
    assert "1 of 1 segments re-hashed: all match" in out and "pairs      4 unique (4 entries)" in out
    assert "complete   yes" in out


@pytest.mark.parametrize(
    ("format", "text"),
    [
        ("trec", "q1 Q0 d1 1 2.5 run\nq1 Q0 d2 2 -0.25 run\n"),
        ("jsonl", '{"qid": "q1", "pid": "d1", "score": 2.5}\n{"qid": "q1", "pid": "d2", "score": -0.25}\n'),
        ("margin_scores", "2.5\t-0.25\tq1\td1\td2\n"),
        ("keys", f"{_splitmix_pair('q1', 'd1'):016x}\t2.5\n{_splitmix_pair('q1', 'd2'):016x}\t-0.25\n"),
    ],
)
def test_every_score_format_imports(tmp_path, format, text):
    store = tmp_path / "s.store"
    assert kstore(tmp_path, "import", f"store={store}", f"file={_file(tmp_path / 'f', text)}", f"format={format}") == 0
    assert _lookup(store, [("q1", "d1"), ("q1", "d2")]) == [2.5, -0.25]
    assert ScoreStore.open(store).meta["imported"]["format"] == format


def test_import_refuses_an_occupied_folder_unless_replace_and_never_a_folder_of_other_files(
    tmp_path, imported, capsys
):
    other = _file(tmp_path / "other.tsv", "q1\td1\t-7\n")
    assert kstore(tmp_path, "import", f"store={imported}", f"file={other}") == 2
    err = capsys.readouterr().err
    assert f"kdir.store: error: {imported}: a score store is already there" in err and "set replace=true" in err
    assert _lookup(imported, [("q1", "d1")]) == [2.5]  # untouched
    assert kstore(tmp_path, "import", f"store={imported}", f"file={other}", "replace=true") == 0  # as printed
    assert _lookup(imported, [("q1", "d1"), ("q1", "d2")])[0] == -7.0
    assert np.isnan(_lookup(imported, [("q1", "d2")])[0])

    folder = tmp_path / "notes"
    folder.mkdir()
    _file(folder / "notes.txt", "mine")
    assert kstore(tmp_path, "import", f"store={folder}", f"file={other}", "replace=true") == 2
    assert "exists and is not a kdir score store" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"

    bad = _file(tmp_path / "bad.tsv", "q1\td1\t1.0\nq1\td2\n")
    assert kstore(tmp_path, "import", f"store={tmp_path / 'new.store'}", f"file={bad}") == 2
    assert f"{bad}:2: expected 'qid<TAB>pid<TAB>score'" in capsys.readouterr().err
    assert not (tmp_path / "new.store").exists() and not list(tmp_path.glob(".new.store.*"))


def test_verify_names_a_damaged_segment_and_info_a_truncated_one(tmp_path, imported, capsys):
    (values,) = (imported / "segments").glob("*.values.npy")
    data = bytearray(values.read_bytes())
    data[-3] ^= 0x10
    values.write_bytes(data)
    assert kstore(tmp_path, "verify", f"store={imported}") == 2
    err = capsys.readouterr().err
    assert f"kdir.store: error: {values}: xxh64 " in err and "is damaged: delete it and rebuild it" in err
    assert kstore(tmp_path, "info", f"store={imported}") == 0  # same sizes: info reads no scores
    size = values.stat().st_size
    with open(values, "r+b") as f:
        f.truncate(size - 4)
    assert kstore(tmp_path, "info", f"store={imported}") == 2
    assert f"{values}: {size - 4} bytes, but {size} were written" in capsys.readouterr().err


def test_verify_reports_missing_pairs_and_an_unfinished_scoring_job(tmp_path, imported, capsys):
    run = _file(tmp_path / "run.trec", "q1 Q0 d1 1 9 r\nq2 Q0 d3 1 8 r\nq9 Q0 d9 1 7 r\n")
    assert kstore(tmp_path, "verify", f"store={imported}", f"pairs={run}") == 2
    captured = capsys.readouterr()
    assert "requested  2 of 3 pairs stored" in captured.out
    assert f"1 of the 3 pairs of {run} are not stored (first: {run}:3: qid='q9', pid='d9')" in captured.err

    scored = ScoreStore.create(tmp_path / "scored", {"teacher": {"name": "CrossEncoder", "weights": "ab" * 32}})
    scored.append(pair_keys_from_ids(["q1"], ["d1"]), [1.0])
    scored.update_meta(scoring={"data": {"source": "bm25.trec"}, "started": "2026-01-02T03:04:05", "finished": None})
    assert kstore(tmp_path, "verify", f"store={scored.path}") == 2
    err = capsys.readouterr().err
    assert "`python -m kdir.score` job (started 2026-01-02T03:04:05, pairs of bm25.trec) did not finish" in err
    assert kstore(tmp_path, "info", f"store={scored.path}") == 0
    out = capsys.readouterr().out
    assert "scoring    last job started 2026-01-02T03:04:05, NOT finished" in out
    assert "teacher    CrossEncoder, weights abababababab" in out and "origin     scored" in out


# ---------------------------------------------------------------- export


def test_export_pairs_of_a_qrels_file_to_tsv_trec_and_jsonl(tmp_path, imported, capsys):
    qrels = _file(tmp_path / "qrels.txt", "q2 0 d3 1\nq2 0 d1 1\nq1 0 d2 0\nq1 0 d9 1\n")
    out = tmp_path / "out.tsv"
    assert kstore(tmp_path, "export", f"store={imported}", f"out={out}", f"pairs={qrels}") == 0
    assert out.read_text() == "q2\td3\t0.1\nq2\td1\t3.0\nq1\td2\t-0.25\n"  # the file's order; (q1, d9) not stored
    assert f"wrote 3 pairs to {out} (4 requested from {qrels}; 1 of them not in the store, skipped)" in (
        capsys.readouterr().out
    )
    trec = tmp_path / "out.trec"
    args = f"store={imported}", f"out={trec}", f"pairs={qrels}"
    assert kstore(tmp_path, "export", *args, "format=trec", "tag=t2") == 0
    assert trec.read_text().splitlines() == ["q2 Q0 d1 1 3.0 t2", "q2 Q0 d3 2 0.1 t2", "q1 Q0 d2 1 -0.25 t2"]
    ids = _file(tmp_path / "ids.txt", "q1\n")
    lines = tmp_path / "q1.jsonl"
    assert (
        kstore(
            tmp_path, "export", f"store={imported}", f"out={lines}", f"pairs={qrels}", f"queries={ids}", "format=jsonl"
        )
        == 0
    )
    assert [json.loads(x) for x in lines.read_text().splitlines()] == [{"qid": "q1", "pid": "d2", "score": -0.25}]

    refused = tmp_path / "refused.tsv"
    assert kstore(tmp_path, "export", f"store={imported}", f"out={refused}", f"pairs={qrels}", "missing=error") == 2
    err = capsys.readouterr().err
    assert "no score for (qid='q1', pid='d9')" in err and "Set missing=skip" in err
    assert not refused.exists()


def test_export_defaults_to_the_imported_file_and_chunking_changes_nothing(tmp_path, imported, capsys):
    whole, chunked = tmp_path / "whole.tsv", tmp_path / "chunked.tsv"
    assert kstore(tmp_path, "export", f"store={imported}", f"out={whole}") == 0
    assert "(the imported file)" in capsys.readouterr().out
    assert kstore(tmp_path, "export", f"store={imported}", f"out={chunked}", "chunk_size=1") == 0
    expected = ["q1\td1\t2.5", "q1\td2\t-0.25", "q2\td1\t3.0", "q2\td3\t0.1", "q1\td1\t2.5"]  # the last (q1, d1)
    assert whole.read_text().splitlines() == chunked.read_text().splitlines() == expected  # one line a file line
    # q1's lines are not together in that file: a run cannot be ranked from it
    assert kstore(tmp_path, "export", f"store={imported}", f"out={tmp_path / 'x.trec'}", "format=trec") == 2
    assert "the lines of query 'q1' together to rank them (sort by query id: sort -s -k1,1)" in capsys.readouterr().err


def test_export_keys_is_a_lossless_copy_that_imports_back(tmp_path, imported):
    keys = tmp_path / "all.keys"
    assert kstore(tmp_path, "export", f"store={imported}", f"out={keys}", "format=keys") == 0
    expected = sorted((_splitmix_pair(q, p), str(np.float32(v))) for (q, p), v in VALUES.items())  # shortest text
    assert keys.read_text().splitlines() == [f"{k:016x}\t{v}" for k, v in expected]
    copy = tmp_path / "copy.store"
    assert kstore(tmp_path, "import", f"store={copy}", f"file={keys}", "format=keys") == 0
    assert _lookup(copy, VALUES) == _lookup(imported, VALUES)


def test_export_of_a_store_without_ids_says_what_to_give_and_the_printed_format_works(tmp_path, capsys):
    store = ScoreStore.create(tmp_path / "filled", {"teacher": {"name": "ColBERT", "weights": "c0" * 32}})
    store.append(pair_keys_from_ids(["q1", "q1"], ["d1", "d2"]), [1.0, 2.0])
    out = tmp_path / "out.tsv"
    assert kstore(tmp_path, "export", f"store={store.path}", f"out={out}") == 2
    err = capsys.readouterr().err
    assert "it records no pair file (a store holds hashed pair keys, not ids): give pairs=" in err
    assert "export the keys: format=keys" in err and not out.exists()
    assert kstore(tmp_path, "export", f"store={store.path}", f"out={out}", "format=keys") == 0
    assert len(out.read_text().splitlines()) == 2


# ---------------------------------------------------------------- merge


def _import(tmp_path: Path, name: str, text: str, teacher: str = "T2") -> Path:
    store = tmp_path / f"{name}.store"
    file = _file(tmp_path / f"{name}.tsv", text)
    assert kstore(tmp_path, "import", f"store={store}", f"file={file}", f"teacher_name={teacher}") == 0
    return store


def test_merge_of_one_teacher_keeps_every_pair_in_one_segment(tmp_path, capsys):
    a = _import(tmp_path, "a", "q1\td1\t1.0\nq1\td2\t2.0\n")
    b = _import(tmp_path, "b", "q1\td2\t2.0\nq2\td1\t5.0\n")  # (q1, d2) in both, same score
    merged = tmp_path / "ab.store"
    assert kstore(tmp_path, "merge", f"store={merged}", f"inputs=[{a},{b}]") == 0
    assert f"merged 2 stores into {merged}: 3 pairs (1 stored in several inputs, 0 of them with different scores" in (
        capsys.readouterr().out
    )
    assert _lookup(merged, [("q1", "d1"), ("q1", "d2"), ("q2", "d1")]) == [1.0, 2.0, 5.0]
    assert len(list((merged / "segments").glob("*.keys.npy"))) == 1
    meta = ScoreStore.open(merged).meta
    assert meta["teacher"] == {"name": "imported:T2"} and meta["merged"]["inputs"] == [str(a), str(b)]
    assert kstore(tmp_path, "info", f"store={merged}") == 0
    assert "origin     merged" in capsys.readouterr().out
    assert kstore(tmp_path, "merge", f"store={merged}", f"inputs=[{a},{b}]") == 2  # occupied
    assert "a score store is already there" in capsys.readouterr().err
    assert kstore(tmp_path, "merge", f"store={merged}", f"inputs=[{a}]", "replace=true") == 0
    assert np.isnan(_lookup(merged, [("q2", "d1")])[0])


def test_merge_refuses_another_teacher_naming_both(tmp_path, capsys):
    a = _import(tmp_path, "a", "q1\td1\t1.0\n")
    other = _import(tmp_path, "o", "q2\td1\t1.0\n", teacher="T1")
    assert kstore(tmp_path, "merge", f"store={tmp_path / 'm'}", f"inputs=[{a},{other}]") == 2
    err = capsys.readouterr().err
    assert f"cannot merge {a} (teacher imported:T2) with {other} (teacher imported:T1): class imported:T2 vs " in err
    assert not (tmp_path / "m").exists()

    teacher = {"name": "DualEncoder", "config": {"pooling": "cls"}, "weights": "a" * 64}
    x = ScoreStore.create(tmp_path / "x", {"teacher": teacher})
    y = ScoreStore.create(tmp_path / "y", {"teacher": teacher | {"weights": "b" * 64}})
    z = ScoreStore.create(tmp_path / "z", {"teacher": teacher | {"config": {"pooling": "mean"}}})
    assert kstore(tmp_path, "merge", f"store={tmp_path / 'm'}", f"inputs=[{x.path},{y.path}]") == 2
    assert "weights aaaaaaaaaaaa vs bbbbbbbbbbbb; merge only stores of one teacher" in capsys.readouterr().err
    assert kstore(tmp_path, "merge", f"store={tmp_path / 'm'}", f"inputs=[{x.path},{z.path}]") == 2
    assert "pooling 'cls' vs 'mean'" in capsys.readouterr().err


def test_merge_conflict_is_refused_and_the_printed_rules_resolve_it(tmp_path, capsys):
    a = _import(tmp_path, "a", "q1\td1\t1.0\nq1\td2\t2.0\n")
    c = _import(tmp_path, "c", "q1\td2\t9.0\n")
    merged = tmp_path / "m.store"
    assert kstore(tmp_path, "merge", f"store={merged}", f"inputs=[{a},{c}]") == 2
    err = capsys.readouterr().err
    key = f"{_splitmix_pair('q1', 'd2'):016x}"
    assert f"{a} and {c} hold different scores for 1 pairs (e.g. pair key {key}: 2.0 vs 9.0); nothing was" in err
    assert not merged.exists() and not list(tmp_path.glob(".m.store.*"))
    for rule, value in (("first", 2.0), ("last", 9.0)):
        out = tmp_path / f"{rule}.store"
        assert kstore(tmp_path, "merge", f"store={out}", f"inputs=[{a},{c}]", f"on_conflict={rule}") == 0  # printed
        assert _lookup(out, [("q1", "d1"), ("q1", "d2")]) == [1.0, value]
        assert ScoreStore.open(out).meta["merged"]["conflicts"] == 1


def test_merge_streams_many_key_ranges_and_equals_a_dict_merge(tmp_path):
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    meta = {"teacher": {"name": "CrossEncoder", "weights": "f" * 64}}
    truth: dict[int, float] = {}
    paths = []
    for s in range(3):
        store = ScoreStore.create(tmp_path / f"s{s}", meta)
        own: dict[int, float] = {}
        for _ in range(3):  # overlapping segments within a store: the newest wins
            keys = rng.choice(pool, size=400, replace=False)
            values = rng.standard_normal(400).astype(np.float32)
            store.append(keys, values)
            own.update(zip(keys.tolist(), values.tolist()))
        truth.update(own)  # across stores: the last input wins (on_conflict=last)
        paths.append(str(store.path))
    out = tmp_path / "m.store"
    assert (
        kstore(tmp_path, "merge", f"store={out}", f"inputs=[{','.join(paths)}]", "on_conflict=last", "chunk_size=64")
        == 0
    )
    merged = ScoreStore.open(out)
    assert len(merged) == len(truth) and merged.meta["count"] == len(truth)
    probe = np.concatenate([pool, rng.integers(0, 2**64, size=100, dtype=np.uint64)])
    expected = np.array([truth.get(k, np.nan) for k in probe.tolist()], dtype=np.float32)
    np.testing.assert_array_equal(merged.lookup(probe), expected)
    assert merged.verify()["verified"] == ["seg-000001-merged"]


# ---------------------------------------------------------------- the command itself


def test_the_command_in_a_real_process_and_a_bad_action(tmp_path, imported):
    r = run_cli("kdir.store", "info", f"store={imported}", f"hydra.run.dir={tmp_path / 'cli'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher    imported:" in r.stdout
    r = run_cli("kdir.store", "action=bogus", f"store={imported}", f"hydra.run.dir={tmp_path / 'cli'}")
    assert r.returncode == 2 and "action='bogus': expected one of info, verify, import, export, merge" in r.stderr
