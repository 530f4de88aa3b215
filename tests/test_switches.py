"""The documented training switches: gradient checkpointing, gradient accumulation, early stopping on the dev metric
and a hub-ready exported folder."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_command


def _grads(model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(inputs).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(quickstart):
    from kdir.models import ColBERT, DualEncoder

    for model in (
        DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32),
        ColBERT(quickstart["model"], dim=16, query_max_length=16, doc_max_length=32),
    ):
        model.eval()  # no dropout: both passes must agree bit for bit in what they compute
        inputs = model.prepare(["alpha beta", "gamma"], ["alpha beta gamma", "delta", "beta"], [[0, 1], [2, 0]])
        plain = _grads(model, inputs)
        model.gradient_checkpointing_enable()
        backbones = [m for m in model.modules() if getattr(m, "is_gradient_checkpointing", False)]
        assert backbones, type(model).__name__
        checkpointed = _grads(model, inputs)
        assert plain.keys() == checkpointed.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "switch",
    [
        "gradient_checkpointing=true",
        "trainer.accumulate_grad_batches=2",
    ],
)
def test_each_switch_trains_on_the_quickstart(switch, tmp_path, quickstart):
    args = ("trainer.max_epochs=1", "eval_untrained=false", f"hydra.run.dir={tmp_path}")
    assert run_command("kdir.run", switch, *args) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["trained"]["nDCG@10"] > 0.05
    config = (tmp_path / "config.yaml").read_text()
    expected = {
        "gradient_checkpointing=true": "gradient_checkpointing: true",
        "trainer.accumulate_grad_batches=2": "accumulate_grad_batches: 2",
    }[switch]
    assert expected in config


def test_early_stopping_stops_a_run_whose_dev_metric_stalls(tmp_path, quickstart):
    """lr 1e-12: the dev metric cannot improve, so the run stops after 1 + patience validations, not 10 epochs."""
    args = ("callbacks=early_stopping", "callbacks.early_stopping.patience=1", "optim.optimizer.lr=1e-12")
    assert run_command("kdir.run", *args, "eval_untrained=false", f"hydra.run.dir={tmp_path}") == 0
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/nDCG@10")}
    assert len(epochs) == 2, epochs  # the first validation, then one without improvement
    assert "pytorch_lightning.callbacks.EarlyStopping" in (tmp_path / "config.yaml").read_text()


def test_the_exported_student_folder_is_hub_ready(tmp_path, quickstart):
    from huggingface_hub import ModelCard

    assert run_command("kdir.run", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}") == 0
    folder = tmp_path / "student"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "sentence-transformers" and "knowledge-distillation" in card.data.tags
    for text in ("margin_mse", "quickstart", "nDCG@10"):
        assert text in card.text, text
    for name in ("config.json", "model.safetensors", "modules.json", "tokenizer.json", "kdir_model.json"):
        assert (folder / name).is_file(), name
