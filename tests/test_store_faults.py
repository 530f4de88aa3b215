"""Store faults: interrupted or failed imports, non-finite scores, batches with nothing cached, incomplete scoring
runs, teachers that differ in settings only, damaged segment files, and ensembles naming foreign classes.

Every error's printed advice is followed here (the printed override or step is run) and must then work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_command

from kdir.data.dataset import IRDataset
from kdir.errors import DamagedStoreError, KdirError, NonFiniteScoreError, OutputExistsError
from kdir.models import DualEncoder, Ensemble
from kdir.stores import ScoreStore, pair_keys_from_ids
from kdir.stores.scoring import candidate_pairs
from kdir.training.signal import TeacherSignal

META = {"teacher": {"name": "cross-encoder", "weights": "abc123"}, "data": {}}


def _tsv(path: Path, n: int, offset: float = 0.0, prefix: str = "q") -> Path:
    path.write_text("".join(f"{prefix}{i}\td{i}\t{i * 0.5 + offset}\n" for i in range(n)))
    return path


def _values(store_path: Path, n: int, prefix: str = "q") -> np.ndarray:
    keys = pair_keys_from_ids([f"{prefix}{i}" for i in range(n)], [f"d{i}" for i in range(n)])
    return ScoreStore.open(store_path).lookup(keys)


def _temps(store_path: Path) -> list[Path]:
    return sorted(store_path.parent.glob(f".{store_path.name}.*.tmp"))


@pytest.fixture
def dataset(beir_dir) -> IRDataset:
    return IRDataset.from_beir(beir_dir, "train")


@pytest.fixture(scope="module")
def cls_dir(quickstart, tmp_path_factory) -> Path:
    """A tiny bi-encoder teacher saved with cls pooling and dot product."""
    path = tmp_path_factory.mktemp("teacher") / "bi"
    DualEncoder(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32).save_pretrained(path)
    return path


# ---------------------------------------------------------------- 1. imports are atomic; scores are finite


def test_failed_import_leaves_no_store_and_the_rerun_imports(tmp_path, dataset):
    store, scores = tmp_path / "s.store", tmp_path / "scores.tsv"
    scores.write_text("q1\td1\t5.0\nq1\td4\tnan\nq2\td2\t6.0\n")
    with pytest.raises(KdirError, match=r"scores.tsv:2: .*finite"):
        TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert not store.exists() and not _temps(store)  # before: an empty store that every rerun kept
    scores.write_text("q1\td1\t5.0\nq1\td4\t1.0\nq2\td2\t6.0\n")  # the file fixed, the same command again
    signal_ = TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert len(signal_.store) == 3
    record = signal_.store.meta["imported"]
    assert record["file"] == str(scores.resolve()) and record["format"] == "pairs" and record["pairs"] == 3
    assert record["size"] == scores.stat().st_size and record["mtime_ns"] == scores.stat().st_mtime_ns
    assert record["finished"]


def test_interrupted_import_is_not_published(tmp_path, dataset, monkeypatch):
    store, scores = tmp_path / "s.store", _tsv(tmp_path / "scores.tsv", 50)
    calls = []
    original = ScoreStore.append

    def append_then_die(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill after the first segment
        return original(self, *args, **kw)

    monkeypatch.setattr(ScoreStore, "append", append_then_die)
    rows = ScoreStore._import_rows
    monkeypatch.setattr(ScoreStore, "_import_rows", lambda self, r, n, *a, **kw: rows(self, r, 10, *a, **kw))
    with pytest.raises(KeyboardInterrupt):
        TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert not (store / "meta.json").exists() and not _temps(store)
    monkeypatch.setattr(ScoreStore, "append", original)
    TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert not np.isnan(_values(store, 50)).any()


_IMPORT_SCRIPT = """
import sys
from kdir.data.dataset import IRDataset
from kdir.stores import ScoreStore
from kdir.training.signal import TeacherSignal

rows = ScoreStore._import_rows
ScoreStore._import_rows = lambda self, r, chunk_size, *a, **kw: rows(self, r, 2000, *a, **kw)
TeacherSignal("cached", sys.argv[1], import_file=sys.argv[2]).bind(IRDataset.from_beir(sys.argv[3], "train"))
"""


def test_kill_9_during_an_import_then_the_rerun_imports_everything(tmp_path, beir_dir, dataset):
    store, scores = tmp_path / "s.store", _tsv(tmp_path / "scores.tsv", 300_000)
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORT_SCRIPT, str(store), str(scores), str(beir_dir)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("**/segments/*.keys.npy")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("**/segments/*.keys.npy")), "the import should have been killed part-way"
    assert not (store / "meta.json").exists()  # before: a store of the first segments, never re-imported
    (stale,) = _temps(store)  # what the killed import left
    old = time.time() - 3600
    for p in (stale, stale / "segments"):
        os.utime(p, (old, old))
    TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert not np.isnan(_values(store, 300_000)).any() and ScoreStore.open(store).meta["imported"]["pairs"] == 300_000
    assert not _temps(store)  # the dead import's folder is removed


def test_store_of_an_import_that_never_finished_is_imported_again(tmp_path, dataset):
    store, scores = tmp_path / "s.store", _tsv(tmp_path / "scores.tsv", 20)
    partial = ScoreStore.create(store, {"teacher": {"name": f"imported:{scores}"}, "data": {"imported_from": "x"}})
    partial.append(pair_keys_from_ids(["q0"], ["d0"]), [0.0])  # what an interrupted import used to leave
    TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert not np.isnan(_values(store, 20)).any() and ScoreStore.open(store).meta["imported"]["pairs"] == 20
    assert not _temps(store)


def test_import_of_a_changed_file_is_refused_and_the_printed_store_works(tmp_path, dataset):
    store, scores = tmp_path / "s.store", _tsv(tmp_path / "scores.tsv", 5)
    TeacherSignal("cached", store, import_file=scores).bind(dataset)
    TeacherSignal("cached", store, import_file=scores).bind(dataset)  # the same file: opened as it is
    _tsv(scores, 7, offset=100.0)
    with pytest.raises(OutputExistsError, match=r"holds another import \(size .* bytes") as e:
        TeacherSignal("cached", store, import_file=scores).bind(dataset)
    new = Path(re.search(r"signal\.store=(\S+)", str(e.value))[1])
    TeacherSignal("cached", new, import_file=scores).bind(dataset)
    assert _values(new, 7).tolist() == [i * 0.5 + 100.0 for i in range(7)]
    assert f"delete {store} to import it again" in str(e.value)
    import shutil

    shutil.rmtree(store)
    TeacherSignal("cached", store, import_file=scores).bind(dataset)
    assert _values(store, 7)[6] == 103.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_scores_are_refused_by_append_and_import(tmp_path, bad):
    store = ScoreStore.create(tmp_path / "s", META)
    keys = pair_keys_from_ids(["q1", "q2"], ["d1", "d2"])
    with pytest.raises(NonFiniteScoreError, match="finite float32"):
        store.append(keys, np.array([1.0, bad], dtype=np.float64))
    with pytest.raises(NonFiniteScoreError, match=r"\(qid='q2', pid='d2'\)"):
        store._import_rows([("q1", "d1", 1.0), ("q2", "d2", bad)], chunk_size=10, source="scores.tsv")
    assert len(store) == 0 and store.meta["count"] == 0


def test_a_batch_with_no_cached_pair_is_an_error_even_when_forced(tmp_path, dataset, tiny_student, cls_dir):
    from kdir.data.collate import TrainCollator

    other = tmp_path / "other.tsv"
    other.write_text("x1\ty1\t1.0\n")  # scores of another collection
    q = np.array([dataset.queries.index["q1"], dataset.queries.index["q2"]])
    item = {
        "rows": torch.arange(2),
        "queries": q,
        "positives": np.array([dataset.corpus.index["d1"], dataset.corpus.index["d2"]]),
        "negatives": np.array([[dataset.corpus.index["d4"]], [dataset.corpus.index["d5"]]]),
    }
    for force in (False, True):
        signal_ = TeacherSignal("cached", tmp_path / "s.store", import_file=other, force=force).bind(dataset)
        with pytest.raises(KdirError, match=r"none of the 4 candidate pairs of a batch are in") as e:
            TrainCollator(dataset, tiny_student.preparer(), "pairwise", signal_)(item)
        assert "signal=fill" not in str(e.value)  # no teacher model: filling is no advice
    teacher = DualEncoder.from_pretrained(cls_dir)
    forced = TeacherSignal("cached", tmp_path / "s.store", model=teacher, force=True).bind(dataset)
    with pytest.raises(KdirError, match=r"none of the 4 .*use signal=fill") as e:
        TrainCollator(dataset, tiny_student.preparer(), "pairwise", forced)(item)
    fill = TeacherSignal("fill", tmp_path / "s.store", model=teacher, force=True).bind(dataset)  # the advice
    batch = TrainCollator(dataset, tiny_student.preparer(), "pairwise", fill)(item)
    assert np.isfinite(fill.scores(batch).numpy()).all()


def test_run_with_forced_signal_and_no_cached_pair_fails_instead_of_training_on_nothing(tmp_path, quickstart, capsys):
    other = tmp_path / "other.tsv"
    other.write_text("x1\ty1\t1.0\n")
    rc = run_command(
        "kdir.run",
        "teacher=scores",
        f"signal.store={tmp_path / 's.store'}",
        f"signal.import_file={other}",
        "signal.force=true",
        "debug=fast",
        "data.num_workers=0",
        "eval_untrained=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert rc == 2  # before: exit 0 after training with loss 0.000
    err = capsys.readouterr().err
    assert "none of the" in err and "signal.force=true would mask every pair" in err, err


# ---------------------------------------------------------------- 2. + 3. kdir.score: complete stores, provenance


def _score(teacher_dir: Path, store: Path, *extra: str) -> int:
    return run_command(
        "kdir.score",
        "teacher=bi_encoder",
        f"teacher.path={teacher_dir}",
        f"store={store}",
        "run_file=${quickstart:data}/runs/train.trec",
        "chunk_size=500",
        "accelerator=cpu",
        f"hydra.run.dir={store.parent / (store.name + '.run')}",
        *extra,
    )


def _requested(quickstart, depth: int) -> np.ndarray:
    ds = IRDataset.from_beir(quickstart["data"], "train")
    pairs = candidate_pairs(ds, run_file=str(quickstart["data"] / "runs" / "train.trec"), depth=depth)
    return pair_keys_from_ids([ds.queries.ids[q] for q in pairs[:, 0]], [ds.corpus.ids[d] for d in pairs[:, 1]])


def test_score_store_ends_complete_for_another_pair_set(tmp_path, cls_dir, quickstart, capsys):
    store = tmp_path / "s.store"
    assert _score(cls_dir, store, "depth=1") == 0
    first = ScoreStore.open(store).lookup(_requested(quickstart, 1))
    assert _score(cls_dir, store, "depth=2") == 0
    want = _requested(quickstart, 2)
    assert not np.isnan(ScoreStore.open(store).lookup(want)).any()  # before: exit 0, ~2,000 pairs missing
    assert np.array_equal(ScoreStore.open(store).lookup(_requested(quickstart, 1)), first)  # kept, not rescored
    assert f"scored {len(want) - len(first)} new pairs" in capsys.readouterr().out


def test_score_stops_with_an_error_when_requested_pairs_are_missing(
    tmp_path, cls_dir, quickstart, capsys, monkeypatch
):
    import kdir.stores.scoring

    monkeypatch.setattr(kdir.stores.scoring, "score_into_store", lambda *a, **kw: 0)  # a job that wrote nothing
    assert _score(cls_dir, tmp_path / "s.store", "depth=1") == 2
    err = capsys.readouterr().err
    assert re.search(r"\d+ of the \d+ requested pairs are not in the store after scoring", err), err
    monkeypatch.undo()
    assert "rerun the same command" in err and _score(cls_dir, tmp_path / "s.store", "depth=1") == 0


def test_score_refuses_a_store_of_other_scoring_settings_and_the_printed_store_works(
    tmp_path, cls_dir, quickstart, capsys
):
    store = tmp_path / "s.store"
    assert _score(cls_dir, store, "depth=1") == 0
    changed = ("teacher.pooling=mean", "teacher.similarity=cosine")
    assert _score(cls_dir, store, "depth=1", *changed) == 2  # before: exit 0, 0 new pairs
    err = capsys.readouterr().err
    assert "pooling 'cls' -> 'mean'" in err and "similarity 'dot' -> 'cosine'" in err
    new = Path(re.search(r"store=(\S+)", err)[1])
    assert _score(cls_dir, new, "depth=1", *changed) == 0
    recorded = ScoreStore.open(new).meta["teacher"]["config"]
    assert recorded["pooling"] == "mean" and recorded["similarity"] == "cosine"
    assert not np.isnan(ScoreStore.open(new).lookup(_requested(quickstart, 1))).any()


@pytest.mark.parametrize("mode", ["cached", "fill"])
def test_signal_refuses_a_store_of_other_scoring_settings_unless_forced(tmp_path, cls_dir, dataset, mode):
    ScoreStore.create(tmp_path / "s", {"teacher": DualEncoder.from_pretrained(cls_dir).provenance()})
    TeacherSignal(mode, tmp_path / "s", model=DualEncoder.from_pretrained(cls_dir)).bind(dataset)  # same: fine
    mean = DualEncoder.from_pretrained(cls_dir, pooling="mean", similarity="cosine")
    with pytest.raises(KdirError, match=r"pooling 'cls' -> 'mean'; similarity 'dot' -> 'cosine'") as e:
        TeacherSignal(mode, tmp_path / "s", model=mean).bind(dataset)  # before: same weights, accepted
    assert "signal.force=true" in str(e.value)
    TeacherSignal(mode, tmp_path / "s", model=mean, force=True).bind(dataset)  # the printed override


def test_imported_store_says_what_it_is_and_is_refused_for_a_model_teacher(tmp_path, cls_dir, dataset):
    scores = _tsv(tmp_path / "scores.tsv", 4)
    teacher = DualEncoder.from_pretrained(cls_dir)
    with pytest.raises(KdirError, match=r"imported from .*scores.tsv \(pairs\), not scores of the configured"):
        TeacherSignal("cached", tmp_path / "s", model=teacher, import_file=scores).bind(dataset)
    assert not (tmp_path / "s").exists()  # refused before importing
    TeacherSignal("cached", tmp_path / "s", import_file=scores).bind(dataset)  # a score-file teacher
    with pytest.raises(KdirError, match=r"imported from .*scores.tsv \(pairs, \d+ bytes\)") as e:
        TeacherSignal("cached", tmp_path / "s", model=teacher).bind(dataset)  # before: the check was skipped
    assert "signal.force=true" in str(e.value)
    forced = TeacherSignal("cached", tmp_path / "s", model=teacher, import_file=scores, force=True).bind(dataset)
    assert forced.store.meta["imported"]["format"] == "pairs"


def test_provenance_covers_settings_and_ensemble_members(cls_dir):
    from kdir.stores import teacher_differences

    cls_teacher = DualEncoder.from_pretrained(cls_dir)
    mean_teacher = DualEncoder.from_pretrained(cls_dir, pooling="mean")
    assert cls_teacher.weights_hash() == mean_teacher.weights_hash()
    assert teacher_differences(cls_teacher.provenance(), mean_teacher.provenance()) == ["pooling 'cls' -> 'mean'"]
    older = cls_teacher.provenance() | {"config": cls_teacher.config | {"freeze_doc_encoder": True}}
    assert teacher_differences(older, cls_teacher.provenance()) == []  # a training setting only
    a = Ensemble([DualEncoder.from_pretrained(cls_dir), DualEncoder.from_pretrained(cls_dir)]).provenance()
    b = Ensemble([DualEncoder.from_pretrained(cls_dir), DualEncoder.from_pretrained(cls_dir, pooling="mean")])
    assert a["weights"] == b.provenance()["weights"]
    assert [d.split(" ")[0] for d in teacher_differences(a, b.provenance())] == ["members"]


# ---------------------------------------------------------------- 4. integrity


def _one_segment_store(tmp_path: Path, n: int = 1000) -> tuple[ScoreStore, Path, np.ndarray]:
    store = ScoreStore.create(tmp_path / "s", META)
    keys = pair_keys_from_ids([f"q{i}" for i in range(n)], [f"d{i}" for i in range(n)])
    store.append(keys, np.arange(n, dtype=np.float32))
    (values,) = (store.path / "segments").glob("*.values.npy")
    return store, values, keys


def test_checksums_are_recorded_and_verified(tmp_path):
    store, values, _ = _one_segment_store(tmp_path)
    sums = json.loads(Path(str(values).replace(".values.npy", ".sums.json")).read_text())
    assert sums["pairs"] == 1000 and sums["values"]["bytes"] == values.stat().st_size
    report = store.verify()
    assert report["segments"] == 1 and len(report["verified"]) == 1 and report["without_checksums"] == []


def test_flipped_bytes_are_found_by_verify_naming_the_file(tmp_path):
    store, values, keys = _one_segment_store(tmp_path)
    data = bytearray(values.read_bytes())
    data[-4 * 500] ^= 0x40  # one bit of the 501st value from the end
    values.write_bytes(data)
    reopened = ScoreStore.open(store.path)  # same size: opening stays cheap and does not read the data
    assert (reopened.lookup(keys) != np.arange(1000)).sum() == 1  # before: silently wrong, and nothing could tell
    with pytest.raises(DamagedStoreError, match=rf"{re.escape(str(values))}: xxh64 \w+, but \w+ was written") as e:
        reopened.verify()
    assert f"the score store {store.path} is damaged: delete it and rebuild it" in str(e.value)


def test_truncated_segment_is_named_on_open(tmp_path):
    store, values, _ = _one_segment_store(tmp_path)
    size = values.stat().st_size
    with open(values, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DamagedStoreError, match=rf"{re.escape(str(values))}: {size - 100} bytes, but {size} were"):
        ScoreStore.open(store.path)  # before: "mmap length is greater than file size"


def test_store_written_before_checksums_opens_and_says_so_on_verify(tmp_path):
    store, values, keys = _one_segment_store(tmp_path)
    for sums in (store.path / "segments").glob("*.sums.json"):
        sums.unlink()
    legacy = ScoreStore.open(store.path)
    assert legacy.lookup(keys)[7] == 7.0
    report = legacy.verify()
    assert report["verified"] == [] and len(report["without_checksums"]) == 1
    with open(values, "r+b") as f:
        f.truncate(values.stat().st_size - 8)
    with pytest.raises(DamagedStoreError, match=r"bytes, but its header describes"):
        ScoreStore.open(store.path)


def test_score_verify_names_the_damaged_file_and_the_rebuild_works(tmp_path, cls_dir, quickstart, capsys):
    store = tmp_path / "s.store"
    assert _score(cls_dir, store, "depth=1") == 0
    (values,) = (store / "segments").glob("*.values.npy")
    data = bytearray(values.read_bytes())
    data[200] ^= 0x01
    values.write_bytes(data)
    assert _score(cls_dir, store, "depth=1", "verify=true") == 2
    err = capsys.readouterr().err
    assert f"{values}: xxh64" in err and "delete it and rebuild it" in err
    import shutil

    shutil.rmtree(store)  # the printed advice
    assert _score(cls_dir, store, "depth=1", "verify=true") == 0


# ---------------------------------------------------------------- 5. ensembles build kdir's classes only


@pytest.mark.parametrize("qualname", ["os.system", "subprocess.Popen", "torch.nn.Linear", "kdir.models.hf.load"])
def test_ensemble_folder_naming_another_class_is_refused(tmp_path, qualname, monkeypatch):
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    (tmp_path / "ens" / "m").mkdir(parents=True)
    config = {"normalize": "none", "weights": None, "members": {"m": qualname}}
    (tmp_path / "ens" / "kdir_model.json").write_text(json.dumps(config))
    with pytest.raises(KdirError, match=rf"member 'm' has class '{re.escape(qualname)}', not one of kdir's models"):
        Ensemble.from_pretrained(tmp_path / "ens")
