"""The four paper recipes (conf/experiment/*) end to end on the quickstart data with tiny models.

Each recipe keeps its method settings (student architecture, teacher kind, loss, layout, optimiser kind);
only data, evaluation, model paths, lengths and step counts are swapped for the offline quickstart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, run_cli
from safetensors.torch import load_file
from test_run import EXPERIMENTS, PAPER_RECIPES

QUICK = [
    "data=quickstart",
    "eval=quickstart",
    "data.num_workers=0",
    "data.batch_size=16",
    "optim.warmup=0",
    "trainer.max_epochs=1",
    "trainer.max_steps=-1",
    "trainer.limit_train_batches=20",
    "trainer.precision=32-true",
    "logger=none",
    "eval_untrained=false",
    "audit.enabled=false",  # the teacher audit has its own tests (test_audit.py)
]
LENGTHS = ["student.query_max_length=16", "student.doc_max_length=32"]
TEACHER_LENGTHS = ["teacher.query_max_length=16", "teacher.doc_max_length=32"]


def test_every_paper_recipe_is_covered():
    assert set(PAPER_RECIPES) <= set(EXPERIMENTS)
    for name in PAPER_RECIPES:
        assert (CONF / "experiment" / f"{name}.yaml").is_file()


def _train(out: Path, *args: str) -> dict:
    res = run_cli("kdir.run", *QUICK, *args, f"hydra.run.dir={out}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, quickstart) -> dict[str, Path]:
    """A ColBERT and a bi-encoder teacher trained (hard labels) on the quickstart, and the ColBERT's expansions."""
    root, model = tmp_path_factory.mktemp("teachers"), quickstart["model"]
    common = [
        "data=quickstart",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "optim.optimizer.lr=3e-3",
        "trainer.precision=32-true",
        "logger=none",
    ]
    for kind, extra in (("colbert", ["teacher.dim=16", *TEACHER_LENGTHS]), ("bi_encoder", [])):
        res = run_cli(
            "kdir.train_teacher",
            f"teacher={kind}",
            f"teacher.path={model}",
            *common,
            *extra,
            f"hydra.run.dir={root / kind}",
        )
        assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(
        "kdir.expand",
        f"teacher.path={root / 'colbert' / 'teacher'}",
        *TEACHER_LENGTHS,
        "data=quickstart",
        "fb_clusters=8",
        "fb_k=4",
        "depth=30",
        "progress=false",
        f"out={root / 'expansion'}",
        f"hydra.run.dir={root / 'expand'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return {
        "colbert": root / "colbert" / "teacher",
        "bi_encoder": root / "bi_encoder" / "teacher",
        "expansion": root / "expansion",
        "model": model,
    }


def test_margin_mse_recipe(tmp_path, quickstart):
    m = _train(
        tmp_path,
        "experiment=margin_mse",
        "teacher=quickstart",
        f"student.model_name_or_path={quickstart['model']}",
        "optim.optimizer.lr=1e-3",
    )
    assert set(m["trained"]) >= {"nDCG@10", "RR@10", "R@100", "R@1000"}, m
    cfg = (tmp_path / "config.yaml").read_text()
    assert "pooling: cls" in cfg and "torch.optim.Adam\n" in cfg and "layout: pairwise" in cfg


def test_tct_colbert_recipe(tmp_path, teachers):
    m = _train(
        tmp_path,
        "experiment=tct_colbert",
        f"teacher.path={teachers['colbert']}",
        *TEACHER_LENGTHS,
        f"student.model_name_or_path={teachers['model']}",
        *LENGTHS,
        "optim.optimizer.lr=3e-3",
    )
    assert set(m["trained"]) >= {"nDCG@10", "RR@10", "R@100", "R@1000"}, m
    cfg = (tmp_path / "config.yaml").read_text()
    assert "tau_teacher: 0.25" in cfg and "skip_tokens: 4" in cfg and "query_mask_padding: true" in cfg


def test_embeddistill_recipe_keeps_the_document_tower_bit_identical(tmp_path, teachers):
    from kdir.data.generated import write_generated

    gen = tmp_path / "generated.tsv"
    write_generated(gen, [f"gen-{i}" for i in range(40)], [f"word{i} topic{i % 5} question" for i in range(40)])
    out = tmp_path / "run"
    m = _train(
        out,
        "experiment=embeddistill",
        f"teacher.path={teachers['bi_encoder']}",
        "student.pooling=mean",
        f"student.model_name_or_path={teachers['model']}",
        "student.query_max_length=16",  # the document side's length is the teacher's
        "optim.optimizer.lr=1e-3",
        f"data.generated={{_target_:kdir.data.generated.GeneratedQueries.from_tsv,path:'{gen}'}}",
        "data.generated_per_batch=4",
        "logger=csv",
    )
    assert "nDCG@10" in m["trained"]
    before = load_file(teachers["bi_encoder"] / "model.safetensors")
    after = load_file(out / "student" / "doc" / "model.safetensors")
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bit-identical: no gradient, no dropout, no LayerNorm update
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss/score" in header and "train/loss/emb_q" in header and "train/loss/emb_d" not in header


def test_embeddistill_symmetric_and_ce_recipes(tmp_path, teachers):
    m = _train(
        tmp_path / "sym",
        "experiment=embeddistill_symmetric",
        f"teacher.path={teachers['bi_encoder']}",
        "student.pooling=mean",
        f"student.model_name_or_path={teachers['model']}",
        "student.query_max_length=16",  # the document side's length is the teacher's
        "trainer.limit_train_batches=5",
    )
    assert "nDCG@10" in m["trained"]
    m = _train(
        tmp_path / "ce",
        "experiment=embeddistill_ce",
        f"teacher.path={teachers['model']}",
        "teacher.query_max_length=12",
        "teacher.max_length=48",
        f"student.model_name_or_path={teachers['model']}",
        *LENGTHS,
        "trainer.limit_train_batches=5",
    )
    assert "nDCG@10" in m["trained"]


def test_collective_kd_recipe(tmp_path, teachers):
    m = _train(
        tmp_path,
        "experiment=collective_kd",
        f"teacher.path={teachers['colbert']}",
        *TEACHER_LENGTHS,
        f"teacher.expansion={teachers['expansion']}",
        "eval=quickstart_maxsim",
        "optim.optimizer.lr=1e-4",
        "student.query_max_length=16",
        "student.doc_max_length=32",
        "negatives.depth=30",
    )
    assert {"nDCG@10", "R@100"} <= set(m["trained"])
    cfg = (tmp_path / "config.yaml").read_text()
    assert "force_positive_max: true" in cfg and "similarity: l2" in cfg and "ranking.trec" in cfg
    assert (tmp_path / "student" / "colbert_linear.safetensors").is_file()  # the student is a ColBERT


def test_recipes_compose_with_swapped_ingredients(tmp_path):
    """`experiment=tct_colbert loss=margin_mse` means what it says: the recipe's student and teacher, pairwise MSE."""
    from conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["experiment=tct_colbert", "loss=margin_mse"])
    assert cfg.loss._target_ == "kdir.losses.MarginMSE" and cfg.student.skip_tokens == 4
    assert cfg.teacher._target_.endswith("ColBERT.from_pretrained") and cfg.signal.mode == "online"
    assert np.isclose(cfg.optim.optimizer.lr, 7e-6)


def test_tct_colbert_hnp_pipeline_runs_on_the_quickstart(tmp_path, quickstart):
    """experiments/recipes/tct_colbert_hnp.sh end to end (every stage, a few batches each): the teacher is trained
    as TCT's (teacher=tct_colbert, logits × 4 × batch), the mined run feeds stages 3 and 4."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "hnp"
    quick = "optim.optimizer.lr=3e-3 optim.warmup=0 trainer.max_epochs=1 trainer.max_steps=-1 logger=none"
    quick += " trainer.accumulate_grad_batches=1 trainer.limit_train_batches=4 data.num_workers=0"
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OUT": str(out),
        "DEPTH": "30",
        "TEACHER_EVAL": "",
        "EXTRA": quick,
        "STUDENT_EXTRA": "eval_untrained=false trainer.precision=32-true",
        "TEACHER_EXTRA": "teacher.query_max_length=16 teacher.doc_max_length=32",
    }
    script = ROOT / "experiments" / "recipes" / "tct_colbert_hnp.sh"
    res = subprocess.run(["bash", str(script)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    settings = json.loads((out / "teacher_hnp" / "teacher" / "kdir_model.json").read_text())
    assert settings["skip_prefix_tokens"] == 4 and settings["marker_as_text"] and not settings["add_sep"]
    assert "batch_logit_scale: 4" in (out / "teacher" / "config.yaml").read_text()
    assert (out / "hn.trec").is_file() and "nDCG@10" in json.loads((out / "student_hnp" / "metrics.json").read_text())[
        "trained"
    ]
    assert "negatives.path" not in (out / "student" / "config.yaml").read_text()
    assert str(out / "hn.trec") in (out / "student_hnp" / "config.yaml").read_text()
