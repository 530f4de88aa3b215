"""Per-step distillation diagnostics: the maths on hand-built scores (against scipy and values worked out by hand),
and a quickstart run logged to W&B offline whose history, read back from the run's ``.wandb`` file, holds them."""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_command

from kdir.training.diagnostics import (
    average_ranks,
    grad_norm,
    kd_statistics,
    margins,
    masked_mean_std,
    spearman,
    top1_agreement,
)

stats = pytest.importorskip("scipy.stats")
NAN = float("nan")


# ------------------------------------------------------------------------------------------------ the maths
def test_average_ranks_are_scipy_rankdata_over_the_masked_candidates():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 5.0], [0.5, 0.5, 9.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
    ranks = average_ranks(scores, mask)
    assert ranks[0, :4].tolist() == [3.5, 1.0, 3.5, 2.0]  # by hand: 1 < 2 < 3 = 3 (ranks 3 and 4 shared)
    for row in range(2):
        keep = mask[row].numpy()
        expected = stats.rankdata(scores[row].numpy()[keep])
        np.testing.assert_allclose(ranks[row].numpy()[keep], expected)


def test_spearman_matches_scipy_row_by_row_with_ties_masks_and_degenerate_rows():
    gen = np.random.default_rng(0)
    student = gen.integers(0, 4, size=(40, 7)).astype(np.float32)  # small integers: many ties
    teacher = gen.integers(0, 5, size=(40, 7)).astype(np.float32)
    mask = gen.random((40, 7)) < 0.8
    mask[0] = False  # no candidate
    mask[1] = [True] + [False] * 6  # one candidate
    student[2] = 1.0  # constant student row
    got = spearman(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(mask)).numpy()
    for i in range(40):
        keep = mask[i]
        if keep.sum() < 2:
            expected = NAN
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy warns on constant input (and returns nan)
                expected = stats.spearmanr(student[i][keep], teacher[i][keep]).statistic
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"row {i}")
    assert np.isnan(got[:3]).all()
    order = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert spearman(order, torch.tensor([[3.0, 2.0, 1.0], [10.0, 20.0, 30.0]])).tolist() == [-1.0, 1.0]


def test_top1_agreement_by_hand():
    student = torch.tensor([[0.1, 0.9, 0.3], [9.0, 1.0, 2.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[1.0, 5.0, 5.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    got = top1_agreement(student, teacher, mask)
    # row 0: the student's top (column 1) ties the teacher's top; row 1: the student's top among the scored
    # candidates is column 2 (column 0 has no teacher score), the teacher's column 1; row 2: opposite orders;
    # row 3: nothing scored
    assert got[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(got[3])


def test_margins_by_hand_pairwise_inbatch_false_negatives_generated_and_masked_positive():
    pairwise = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    mean_gap, max_gap = margins(pairwise, torch.tensor([0]))
    assert mean_gap.tolist() == [3.0] and max_gap.tolist() == [2.0]  # 5 - (1+2+3)/3, 5 - 3

    inbatch = torch.tensor([[4.0, 3.0, 1.0, 0.0], [2.0, 6.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    positive = torch.tensor([0, 1, -1, 2])  # row 2: a generated query
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[0, 1] = True  # another labelled positive of query 0: not a negative
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1, 0] = False  # no teacher score: left out
    mask[3, 2] = False  # the positive itself unscored: no margin
    mean_gap, max_gap = margins(inbatch, positive, mask, exclude)
    # row 0: negatives {1, 0} -> 4 - 0.5, 4 - 1; row 1: negatives {1, 1} -> 6 - 1, 6 - 1
    assert mean_gap[:2].tolist() == [3.5, 5.0] and max_gap[:2].tolist() == [3.0, 5.0]
    assert math.isnan(mean_gap[2]) and math.isnan(max_gap[3])


def test_masked_mean_std_is_numpys_population_statistics_of_the_scored_pairs():
    gen = np.random.default_rng(1)
    x, mask = gen.normal(3, 2, size=(8, 5)).astype(np.float32), gen.random((8, 5)) < 0.6
    mean, std = masked_mean_std(torch.from_numpy(x), torch.from_numpy(mask))
    assert mean.item() == pytest.approx(x[mask].mean(), rel=1e-5)
    assert std.item() == pytest.approx(x[mask].std(), rel=1e-5)


def test_kd_statistics_of_a_batch_skip_undefined_rows_and_count_masked_pairs():
    student = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[9.0, NAN, 1.0], [0.0, 5.0, 1.0]])
    mask = ~torch.isnan(teacher)
    out = kd_statistics(student, teacher, torch.tensor([0, 1]), mask, torch.zeros(2, 3, dtype=torch.bool))
    assert out["masked_fraction"].item() == pytest.approx(1 / 6)
    # row 0 over its scored candidates {0, 2}: student 3 > 2, teacher 9 > 1 -> rho 1, top-1 agrees;
    # row 1: student ranks (1, 2, 3), teacher (1, 3, 2) -> rho 0.5 (scipy), student's top (column 2) is not the
    # teacher's (column 1)
    assert out["spearman"].item() == pytest.approx((1.0 + stats.spearmanr([1, 2, 3], [0, 5, 1]).statistic) / 2)
    assert out["top1_agreement"].item() == pytest.approx(0.5)
    # margins: student row 0: 3 - 2 (column 1 unscored), row 1: 2 - mean(1, 3) = 0, 2 - 3 = -1
    assert out["student_margin_mean"].item() == pytest.approx((1.0 + 0.0) / 2)
    assert out["student_margin_max"].item() == pytest.approx((1.0 - 1.0) / 2)
    assert out["teacher_margin_mean"].item() == pytest.approx((8.0 + 4.5) / 2)
    assert out["student_mean"].item() == pytest.approx(np.mean([3, 2, 1, 2, 3]))
    assert out["teacher_std"].item() == pytest.approx(np.std([9, 1, 0, 5, 1]), rel=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.values())
    no_teacher = kd_statistics(student, None, torch.tensor([0, 1]))
    assert set(no_teacher) == {"student_mean", "student_std", "student_margin_mean", "student_margin_max"}


def test_grad_norm_is_the_total_norm_clip_grad_norm_measures():
    assert grad_norm([torch.tensor([3.0, 4.0]), None, torch.tensor([[12.0]])]).item() == pytest.approx(13.0)
    assert grad_norm([None]) is None
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    measured = grad_norm(p.grad for p in params).item()
    assert torch.nn.utils.clip_grad_norm_(params, 1.0).item() == pytest.approx(measured, rel=1e-6)


# ------------------------------------------------------------------------- a run logged to W&B (offline)
def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the W&B offline run under ``run_dir/wandb``, read from its ``.wandb`` file.

    The file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then records in 32 KiB blocks
    (LevelDB log framing: crc32, length, type full/first/middle/last), each a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, quickstart) -> Path:
    """A quickstart run (6 steps, logged every 2, CSV + W&B offline) whose teacher scores lack 3 pairs in 4."""
    tmp = tmp_path_factory.mktemp("masked")
    lines = (quickstart["data"] / "teacher" / "scores.tsv").read_text().splitlines()
    (tmp / "subset.tsv").write_text("".join(line + "\n" for i, line in enumerate(lines) if i % 4 == 0))
    overrides = [
        "logger=many",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.log_every_n_steps=2",
        f"signal.store={tmp / 'subset.store'}",
        f"signal.import_file={tmp / 'subset.tsv'}",
        "signal.force=true",  # missing pairs are masked out of the loss
        f"hydra.run.dir={tmp / 'run'}",
    ]
    assert run_command("kdir.run", *overrides) == 0
    return tmp / "run"


KD_KEYS = [
    f"train/kd/{name}"
    for name in (
        "spearman",
        "top1_agreement",
        "student_mean",
        "student_std",
        "teacher_mean",
        "teacher_std",
        "student_margin_mean",
        "student_margin_max",
        "teacher_margin_mean",
        "teacher_margin_max",
        "masked_fraction",
    )
]


def test_wandb_history_holds_the_diagnostics_on_logging_steps(masked_run):
    rows = wandb_history(masked_run)
    train = [r for r in rows if "train/loss" in r]
    assert [r["trainer/global_step"] for r in train] == [1, 3, 5]  # log_every_n_steps=2: steps 1, 3, 5 of 0..5
    for row in train:
        for key in [*KD_KEYS, "train/lr", "train/grad_norm", "train/queries_per_s", "train/loss/margin_mse"]:
            assert key in row, (key, row["trainer/global_step"])
        assert -1 <= row["train/kd/spearman"] <= 1 and 0 <= row["train/kd/top1_agreement"] <= 1
        assert row["train/grad_norm"] > 0 and row["train/queries_per_s"] > 0
        assert 0.5 < row["train/kd/masked_fraction"] < 1  # 1 pair in 4 kept
        # linear decay from lr 3e-3 over the 6 steps (warm-up int(0.1 * 6) = 0 steps): lr_k = 3e-3 (6 - k) / 6
        assert row["train/lr"] == pytest.approx(3e-3 * (6 - row["trainer/global_step"]) / 6)
    assert any("train/hist/student/values" in r or "train/hist/student/bins" in r for r in rows)  # histograms
    assert any("val/nDCG@10" in r for r in rows)
    untrained = json.loads((masked_run / "metrics.json").read_text())["untrained"]
    (step0,) = [r for r in rows if r.get("trainer/global_step") == 0 and "test/nDCG@10" in r]
    assert step0["test/nDCG@10"] == pytest.approx(untrained["nDCG@10"])  # the untrained student, at step 0
    (audit,) = [r for r in rows if "audit/teacher/nDCG@10" in r]  # the teacher audit, before training
    assert audit["trainer/global_step"] == 0 and -1 <= audit["audit/agreement/spearman"] <= 1
    tests = [r for r in rows if "test/nDCG@10" in r]
    assert len(tests) == 2 and tests[-1]["trainer/global_step"] == 6


def test_the_masked_fraction_warning_is_logged_once(masked_run):
    log = (masked_run / "run.log").read_text()
    warnings_logged = [line for line in log.splitlines() if "have no teacher score" in line]
    assert len(warnings_logged) == 1 and "WARNING" in warnings_logged[0], log[-2000:]
    assert "callbacks.kd_diagnostics.masked_warning=0.5" in warnings_logged[0]


def test_the_csv_log_holds_the_diagnostics_and_the_step0_test_row(masked_run):
    from kdir.utils.report import read_curves

    curves = read_curves(masked_run / "csv" / "metrics.csv")
    assert set(KD_KEYS) <= set(curves) and [s for s, _ in curves["train/kd/spearman"]] == [1, 3, 5]
    assert [s for s, _ in curves["test/nDCG@10"]] == [0, 6]
