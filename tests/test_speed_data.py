"""The data path's speed switches: length bucketing (exactly once per epoch), persistent workers that follow the
stream's epoch, device-side finite checks, and torch.compile of the student (same loss as eager)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_command
from torch.utils.data import DataLoader

from kdir.data.stream import ExampleStream


class _Examples:
    """The part of :class:`kdir.data.examples.Examples` the stream reads."""

    def __init__(self, n: int):
        self.queries = np.arange(n)
        self.positives = np.arange(n) + 1000
        self.n_negatives = 0

    def __len__(self) -> int:
        return len(self.queries)

    def negatives_for(self, rows, rng):
        return np.zeros((len(rows), 0), dtype=np.int64)


def _lengths(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(10, 1000, n)


def _epoch_rows(streams: list[ExampleStream], workers: int = 0) -> list[list[int]]:
    out = []
    for s in streams:
        loader = DataLoader(s, batch_size=None, num_workers=workers)
        out.extend(item["rows"].tolist() for item in loader)
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2)])
def test_bucketing_keeps_every_example_exactly_once_with_the_same_batch_sizes(world, workers):
    n, batch, lengths = 203, 8, _lengths(203)
    for epoch in (0, 1):
        plain = [ExampleStream(_Examples(n), batch, 3, True, r, world) for r in range(world)]
        bucketed = [ExampleStream(_Examples(n), batch, 3, True, r, world, 5, lengths) for r in range(world)]
        for s in plain + bucketed:
            s.set_epoch(epoch)
        rows_b = _epoch_rows(bucketed, workers)
        assert sorted(r for b in rows_b for r in b) == list(range(n))  # exactly once across ranks and workers
        assert sorted(map(len, rows_b)) == sorted(map(len, _epoch_rows(plain)))
        assert all(len(s) == len(p) for s, p in zip(bucketed, plain))  # same steps per rank: no DDP hang
        # less padding: each batch is padded to its longest example
        padded = [sum(len(b) * lengths[b].max() for b in map(np.array, rows)) for rows in (rows_b, _epoch_rows(plain))]
        assert padded[0] < 0.8 * padded[1]


def test_bucketing_windows_hold_the_same_examples_and_differ_by_epoch():
    n, batch, k, lengths = 160, 8, 4, _lengths(160)
    s = ExampleStream(_Examples(n), batch, 1, True, 0, 1, k, lengths)
    plain = ExampleStream(_Examples(n), batch, 1).batches(0)
    plan = s.batches(0)
    for w in range(0, len(plan), k):  # a window re-cuts its own examples only
        assert sorted(np.concatenate(plan[w : w + k])) == sorted(np.concatenate(plain[w : w + k]))
        spans = [(lengths[b].min(), lengths[b].max()) for b in plan[w : w + k]]
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # sorted by length: batches do not overlap
    assert [b.tolist() for b in s.batches(0)] == [b.tolist() for b in plan]  # a function of (seed, epoch)
    assert [b.tolist() for b in s.batches(1)] != [b.tolist() for b in plan]


def test_bucketed_resume_trains_the_rest_of_the_same_epoch():
    n, batch, lengths = 120, 8, _lengths(120)
    full = ExampleStream(_Examples(n), batch, 2, True, 0, 1, 3, lengths)
    full.set_epoch(1)
    rest = ExampleStream(_Examples(n), batch, 2, True, 0, 1, 3, lengths)
    rest.set_epoch(1, start=5)
    assert [i["rows"].tolist() for i in rest] == [i["rows"].tolist() for i in full][5:]


def test_persistent_workers_follow_the_epoch_set_in_the_main_process():
    s = ExampleStream(_Examples(64), 8, seed=4)
    loader = DataLoader(s, batch_size=None, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in range(3):
        s.set_epoch(epoch)
        seen.append(sorted(tuple(i["rows"].tolist()) for i in loader))
    expected = [sorted(tuple(b.tolist()) for b in s.batches(e)) for e in range(3)]
    assert seen == expected and seen[0] != seen[1]


def test_bucketing_needs_lengths_and_bad_settings_name_the_key(quickstart):
    from kdir.data.datamodule import DistillDataModule
    from kdir.errors import ConfigError

    with pytest.raises(ValueError, match="one length per example"):
        ExampleStream(_Examples(10), 2, bucket_batches=3)
    for kw, key in (
        ({"bucket_batches": -1}, "data.bucket_batches=-1"),
        ({"persistent_workers": True, "num_workers": 0}, "data.persistent_workers=true needs"),
        ({"prefetch_factor": 0, "num_workers": 1}, "data.prefetch_factor=0"),
    ):
        with pytest.raises(ConfigError, match=key):
            DistillDataModule(None, None, **kw)  # checked before the split is read


SPEED_KNOBS = [
    "data.num_workers=1",
    "data.persistent_workers=true",
    "data.prefetch_factor=2",
    "data.pin_memory=true",  # no accelerator here: PyTorch warns and leaves batches unpinned
    "data.bucket_batches=4",
    "data.pretokenize=true",
    "finite_check=log",
    "gradient_checkpointing=true",
    "student.encode_chunk_size=5",
    "trainer.precision=bf16-mixed",
]


def test_the_speed_knobs_compose_and_train_the_quickstart(tmp_path, quickstart):
    overrides = [*SPEED_KNOBS, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=3",
                 "eval_untrained=false"]  # fmt: skip
    assert run_command("kdir.run", *overrides, "audit.enabled=false", f"hydra.run.dir={tmp_path}") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # 8 steps from scratch: a tested run, not a good one
    assert 0 <= metrics["trained"]["nDCG@10"] <= 1
    assert json.loads((tmp_path / "throughput.json").read_text())["steps"] == 8


def test_finite_check_log_stops_at_the_next_logging_step_naming_the_steps(tmp_path, quickstart):
    from test_inputs import _bad_teacher

    out = tmp_path / "out"
    overrides = ["teacher=bi_encoder", f"teacher.path={_bad_teacher(tmp_path, quickstart)}", "finite_check=log",
                 "trainer.log_every_n_steps=3", "trainer.max_steps=7", "eval_untrained=false", "audit.enabled=false",
                 "export_student=false", f"hydra.run.dir={out}"]  # fmt: skip
    assert run_command("kdir.run", *overrides) == 2
    log = (out / "run.log").read_text()
    assert "global steps 0-2: " in log, log[-2000:]
    assert "teacher scores were not finite, from the online teacher DualEncoder" in log
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor: C++ build
def test_a_compiled_student_gives_the_eager_loss_and_gradients(tiny_student, backend):
    import copy

    from kdir.losses import InfoNCE
    from kdir.losses.base import Candidates
    from kdir.training.compile import compile_encoders

    torch._dynamo.reset()
    eager = copy.deepcopy(tiny_student).train()
    for m in eager.modules():  # no dropout: the two runs see the same computation
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    compiled = copy.deepcopy(eager)
    assert compile_encoders(compiled, backend=backend) == ["query_encoder"]  # one shared tower, compiled once
    queries = ["what is the first topic", "a second, longer query about the other topic"]
    docs = ["document one about topic zero", "another document", "a third document about topic two, a bit longer"]
    inputs = eager.preparer()(queries, docs, np.array([[0, 1, 2], [1, 2, 0]]))
    loss = InfoNCE("pairwise")
    values = []
    for model in (eager, compiled):
        scores = model(inputs)
        mask = torch.ones_like(scores, dtype=torch.bool)
        c = Candidates(scores, None, torch.zeros(2, dtype=torch.long), mask, ~mask, "pairwise")
        value = loss(c)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        values.append((value.detach(), grads))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(values[1][1], values[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and exports are unchanged


def test_rows_known_on_the_host_give_the_losses_of_the_device_mask():
    """``Candidates.n_real`` (real rows first, then generated) selects by slices, with no device-to-host sync; the
    terms equal those of the boolean-mask selection."""
    from dataclasses import replace

    from kdir.losses import Composite, EmbedMatch, InfoNCE, SoftmaxCEDistill
    from kdir.losses.base import Candidates

    g = torch.Generator().manual_seed(0)
    b, n_gen, cols = 4, 3, 7
    student, teacher = torch.randn(b + n_gen, cols, generator=g), torch.randn(b + n_gen, cols, generator=g)
    positive = torch.tensor([0, 1, 2, 3] + [-1] * n_gen)
    mask = torch.ones_like(student, dtype=torch.bool)
    generated = torch.arange(b + n_gen) >= b
    emb = {"query": (torch.randn(b + n_gen, 5, generator=g), torch.randn(b + n_gen, 5, generator=g))}
    c = Candidates(student, teacher, positive, mask, ~mask, "inbatch", generated, emb)
    loss = Composite(
        {
            "score": SoftmaxCEDistill("inbatch", temperature=0.5, applies_to="generated"),
            "nce": InfoNCE("inbatch", temperature=0.1),
            "emb": EmbedMatch(side="query", layout="inbatch", applies_to="all"),
        },
        "inbatch",
    )
    by_mask, by_slice = loss.terms(c), loss.terms(replace(c, n_real=b))
    assert by_mask.keys() == by_slice.keys()
    for name in by_mask:
        torch.testing.assert_close(by_slice[name], by_mask[name])
    assert c.rows("real") is not None and replace(c, n_real=b).rows("real") == slice(0, b)
    only_real = replace(c, generated=torch.zeros_like(generated), positive=torch.arange(b + n_gen), n_real=b + n_gen)
    assert only_real.rows("real") is None and float(loss.terms(only_real)["score"]) == 0.0  # no generated rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-to-host syncs are a CUDA matter")
def test_a_training_step_makes_no_host_sync_with_finite_check_log(tiny_student):
    from functools import partial

    from kdir.data.batch import candidate_columns
    from kdir.losses import InfoNCE
    from kdir.training.module import DistillModule

    student = tiny_student.cuda()
    module = DistillModule(student, InfoNCE("pairwise"), partial(torch.optim.AdamW, lr=1e-3), finite_check="log")
    inputs = student.preparer()(["q one", "q two"], ["d1", "d2", "d3", "d4"], candidate_columns(2, 1, "pairwise"))
    from kdir.data.batch import TrainBatch

    batch = TrainBatch(
        inputs={k: v.cuda() for k, v in inputs.items()},
        positive=torch.zeros(2, dtype=torch.long, device="cuda"),
        false_negative=torch.zeros(2, 2, dtype=torch.bool, device="cuda"),
        generated=torch.zeros(2, dtype=torch.bool, device="cuda"),
        rows=torch.arange(2, device="cuda"),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = module.candidates(batch)
        terms = module.loss.terms(c)
        module._count_nonfinite(c, terms, 0, None, read=False)
        sum(terms.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dataloader_workers_get_no_model_weights(tmp_path, quickstart):
    """What a worker is sent (the stream and the collator, pickled under a spawn start method) holds tokenizers,
    texts and store handles, never a module of the student or of the online teacher."""
    import io
    import pickle

    from conftest import compose_cfg
    from hydra.utils import instantiate

    cfg = compose_cfg(tmp_path, ["teacher=bi_encoder", f"teacher.path={quickstart['model']}", "loss=kl"])
    student, loss = instantiate(cfg.student), instantiate(cfg.loss)
    signal = instantiate(cfg.signal, model=instantiate(cfg.teacher))
    dm = instantiate(cfg.data)
    signal.bind(dm.train)
    dm.attach(student.preparer(), loss.layout, signal, {s: student.formatter(s) for s in ("query", "doc")})
    loader = dm.train_dataloader()
    modules: list[str] = []

    class Flagging(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.nn.Module):
                modules.append(type(obj).__name__)
            return None

    Flagging(io.BytesIO()).dump((loader.dataset, loader.collate_fn))
    assert modules == []
    assert next(iter(loader)).teacher_inputs  # and the worker's copy still prepares the teacher's inputs
