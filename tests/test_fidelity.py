"""Fidelity of the recipes to the official code (README, "Fidelity to the official code"): each item checked against
values built by hand from the original formulas and token layouts on tiny hand-made inputs (castorini/tct_colbert,
castorini/pyserini, jihyukkim-nlp/CollectiveKD, sebastian-hofstaetter/matchmaker), never against kdir's own output."""

from __future__ import annotations

import functools
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_cfg, run_cli
from hydra.utils import instantiate
from transformers import BertConfig, BertForPreTraining, BertModel, BertTokenizerFast

from kdir.models import ColBERT, CollectiveColBERT, DualEncoder, maxsim
from kdir.models.released import convert_tct_colbert, main
from kdir.stores import ExpansionStore, id_hashes

SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a cat dog sat on mat red blue fox quick brown jumps over lazy what who where is house runs q d".split()
PUNCT = [".", ",", "!", "?", "[", "]"]
QUERIES = ["what cat sat", "who jumps over the lazy dog ?"]
DOCS = ["the cat sat on the mat .", "a quick brown fox , jumps !", "the red house", "blue dog runs"]


def close(a, b, atol: float = 1e-4) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return a.shape == b.shape and torch.allclose(a, b, atol=atol)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny BERT configuration and WordPiece tokenizer (the ``base`` of converted checkpoints)."""
    out = tmp_path_factory.mktemp("base")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL + WORDS + PUNCT)}, do_lower_case=True)
    BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(base, tmp_path_factory) -> Path:
    """The tiny BERT with random weights, as an HF folder."""
    out = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(base), add_pooling_layer=False).save_pretrained(out)
    BertTokenizerFast.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def colbert_dnn(base, tmp_path_factory) -> Path:
    """A ColBERT v1 / CollectiveKD ``colbert.dnn`` (save_checkpoint's layout, DDP ``module.`` prefix included)."""
    torch.manual_seed(3)
    bert = BertModel(BertConfig.from_pretrained(base))  # with its pooler, as ColBERT(BertPreTrainedModel)
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    state["module.linear.weight"] = torch.randn(16, 32) * 0.2
    arguments = {"query_maxlen": 12, "doc_maxlen": 24, "dim": 16, "similarity": "l2", "mask_punctuation": True}
    arguments |= {"lr": 3e-06, "bsize": 36, "triples": "/data/triples.train.small.ids.jsonl", "amp": True}
    ckpt = {
        "epoch": 0,
        "batch": 150000,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 3e-6}]},
        "arguments": arguments,
    }
    path = tmp_path_factory.mktemp("dnn") / "colbert.dnn"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def converted(colbert_dnn, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "colbert"
    assert main(["colbert-v1", "--checkpoint", str(colbert_dnn), "--base", str(base), "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- references: the official formulas, by hand


def v1_query_ids(tok, texts: list[str], maxlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CollectiveKD QueryTokenizer.tensorize: '. ' placeholder, [unused0] at 1, pad ids 0 -> [MASK], mask kept."""
    obj = tok([". " + x for x in texts], padding="max_length", truncation=True, return_tensors="pt", max_length=maxlen)
    ids, mask = obj["input_ids"], obj["attention_mask"]
    ids[:, 1] = tok.convert_tokens_to_ids("[unused0]")
    ids[ids == 0] = tok.mask_token_id
    return ids, mask


def v1_doc_ids(tok, texts: list[str], maxlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CollectiveKD DocTokenizer.tensorize: '. ' placeholder, [unused1] at 1, padded to the longest."""
    obj = tok([". " + x for x in texts], padding="longest", truncation="longest_first", return_tensors="pt",
              max_length=maxlen)  # fmt: skip
    ids, mask = obj["input_ids"], obj["attention_mask"]
    ids[:, 1] = tok.convert_tokens_to_ids("[unused1]")
    return ids, mask


@torch.no_grad()
def v1_scores(model: ColBERT, queries, docs, expansion=None, weights=None) -> torch.Tensor:
    """colbert/modeling/colbert.py (CollectiveKD): Q normalised; D * mask (punctuation, pad id 0) then normalised;
    score = Σ_i w_i max_j −‖Q_i − D_j‖² over every position of the padded D, Q extended by the expansions."""
    tok, bert, linear = model.tokenizer, model.bert.eval(), model.linear
    q_ids, q_att = v1_query_ids(tok, queries, model.config["query_max_length"])
    d_ids, d_att = v1_doc_ids(tok, docs, model.config["doc_max_length"])
    Q = F.normalize(linear(bert(q_ids, attention_mask=q_att)[0]), p=2, dim=2)
    skip = {tok.convert_tokens_to_ids(p) for p in ".,!?[]"}  # string.punctuation in this vocabulary
    mask = torch.tensor([[(x not in skip) and x != 0 for x in d] for d in d_ids.tolist()]).unsqueeze(2).float()
    D = F.normalize(linear(bert(d_ids, attention_mask=d_att)[0]) * mask, p=2, dim=2)
    wts = torch.ones(Q.shape[:2])
    if expansion is not None:
        Q, wts = torch.cat([Q, expansion], 1), torch.cat([wts, weights], 1)
    QD = -1.0 * ((Q.unsqueeze(2).unsqueeze(1) - D.unsqueeze(1).unsqueeze(0)) ** 2).sum(-1)
    return (QD.max(-1).values * wts.unsqueeze(1)).sum(-1)  # [Nq, Nd]


def tct_ids(tok, text: str, marker: str, max_len: int, query: bool) -> list[int]:
    """castorini/tct_colbert tokenization.convert_to_colbert_input: tokenize(marker + text)[:max_len - 1], [CLS]
    first, no [SEP], queries [MASK]-padded to max_len."""
    tokens = ["[CLS]"] + tok.tokenize(f"{marker} {text}")[: max_len - 1]
    if query:
        tokens += ["[MASK]"] * (max_len - len(tokens))
    return tok.convert_tokens_to_ids(tokens)


# ---------------------------------------------------------------- 1. TCT teacher training temperature


def hnp_stage_commands(env: dict[str, str]) -> dict[str, list[str]]:
    """The HN+ pipeline's stage commands (DRY_RUN=1), by stage name: ``[module, *overrides]``."""
    script = ROOT / "experiments" / "recipes" / "tct_colbert_hnp.sh"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    res = subprocess.run(["bash", str(script)], env=os.environ | {"PATH": path, "DRY_RUN": "1"} | env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    stages = {}
    for line in res.stdout.strip().splitlines():
        name, python, dash_m, module, *overrides = shlex.split(line)
        assert (python, dash_m) == ("python", "-m"), line
        stages[name] = [module, *overrides]
    return stages


MSMARCO = {"DATA": "msmarco", "EVAL": "dl19", "TEACHER_EVAL": "", "TEACHER_INIT": "bert-base-uncased"}
MSMARCO |= {"STUDENT_ARGS": "", "EXTRA": "", "OUT": "/runs/hnp"}


def compose_stage(tmp_path: Path, command: list[str]):
    module, *overrides = command
    return compose_cfg(tmp_path, overrides, name=module.removeprefix("kdir."))


def test_tct_teacher_trains_with_the_logits_times_4_per_core_batch(tmp_path):
    """train/model_fn.py:129: batch_max_sim_softmax_loss(..., soft=4 * batch_size) with the per-core batch 12 of
    main.py (train_batch_size 96, 8 TPU cores): softmax CE of the logits × 48; AdamW (wd 0.01, ε 1e-6), lr 7e-6,
    10K warm-up, linear decay, clip 1.0 (optimization.py), 160K steps (README)."""
    from kdir.losses import InfoNCE
    from kdir.losses.base import Candidates

    for stage in ("0_teacher", "3_teacher_hnp"):
        cfg = compose_stage(tmp_path, hnp_stage_commands(MSMARCO)[stage])
        assert cfg.teacher._target_ == "kdir.models.ColBERT.from_pretrained" and cfg.teacher.skip_prefix_tokens == 4
        assert cfg.batch_logit_scale * cfg.data.batch_size == 48  # kdir.train_teacher: temperature 1 / 48
        opt = cfg.optim
        assert opt.optimizer._target_ == "torch.optim.AdamW" and opt.optimizer.lr == pytest.approx(7e-6)
        assert opt.optimizer.weight_decay == 0.01 and opt.optimizer.eps == pytest.approx(1e-6)
        assert (opt.warmup, opt.schedule) == (10000, "linear")
        assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 96
        assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_steps) == (1.0, 160000)
    # the loss by hand: B = 2 per core, logits [B, 2B] (positives first), CE of logits × 4·B = × 8
    logits = torch.tensor([[3.0, 1.0, 2.5, 0.5], [0.2, 2.0, 1.9, 2.1]])
    soft = 4 * 2
    expected = np.mean([-(soft * 3.0 - np.log(np.exp(soft * logits[0].numpy()).sum())),
                        -(soft * 2.0 - np.log(np.exp(soft * logits[1].numpy()).sum()))])  # fmt: skip
    loss = InfoNCE(temperature=1 / soft)
    c = Candidates(logits, None, torch.tensor([0, 1]), torch.ones(2, 4, dtype=torch.bool),
                   torch.zeros(2, 4, dtype=torch.bool), "inbatch")  # fmt: skip
    assert loss(c).item() == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- 2. global batch, per-device pool


@pytest.mark.parametrize(
    "recipe,per_device,accumulate,clip", [("tct_colbert", 12, 8, 1.0), ("collective_kd", 18, 2, 2.0)]
)
def test_global_batch_by_accumulation_keeps_the_per_device_pool(recipe, per_device, accumulate, clip, tmp_path):
    """TCT: 96 = 8 cores × 12 (each core's in-batch pool 2 × 12); CollectiveKD: 36 = 2 GPUs × 18 (pool 2 × 18,
    training.py:41-43 bsize // nranks); clipping 1.0 (optimization.py:78) / 2.0 (colbert/utils/amp.py:30,36)."""
    cfg = compose_cfg(tmp_path, [f"experiment={recipe}"])
    assert cfg.data.batch_size == per_device and cfg.trainer.accumulate_grad_batches == accumulate
    assert cfg.loss.layout == "inbatch" and cfg.gather_across_devices is False  # the pool: one micro-batch
    assert cfg.trainer.gradient_clip_val == clip


# ---------------------------------------------------------------- 3. zero vectors for masked document tokens


def test_maxsim_zero_masked_tokens_by_hand():
    """D * mask then normalise: a masked position is the zero vector, so every max also sees sim(q_i, 0)."""
    q = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])  # 1 query, 2 unit tokens
    d = torch.tensor([[[0.0, -1.0], [0.0, 1.0], [-1.0, 0.0]]])  # 1 doc, 3 tokens, the middle one masked
    d_mask = torch.tensor([[True, False, True]])
    zeroed = d * d_mask[..., None]  # the official tensor
    # l2: token 0: max(-|q0-d0|^2 = -(0.36+3.24), -|q0|^2 = -1, -|q0-d2|^2 = -(2.56+0.64)) = -1
    #     token 1: max(-(1+1), -1, -(4+0)) = -1
    ref_l2 = (-((q[0][:, None] - zeroed[0][None]) ** 2).sum(-1)).max(-1).values.sum()
    assert close(ref_l2, -2.0)
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, d_mask, "l2", masked_doc_tokens="zero"), [[-2.0]])
    # excluded (kdir's default): -3.2 + -2
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, d_mask, "l2"), [[-5.2]])
    # cosine: the zero vector gives 0: token 0 max(-0.8, 0, -0.6) = 0, token 1 max(0, 0, -1) = 0
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, d_mask, masked_doc_tokens="zero"), [[0.0]])
    # TCT-ColBERT: a zero logit becomes -15 (loss.py:63): masked positions score -15
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, d_mask, masked_doc_tokens=-15.0), [[0.0 - 0.6]])
    # a document with no masked position gets no floor; one whose tokens are all masked scores the floor
    full, none = torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)
    ones = torch.ones(1, 2, dtype=torch.bool)
    assert close(maxsim(q, ones, d, full, "l2", masked_doc_tokens="zero"), maxsim(q, ones, d, full, "l2"))
    assert close(maxsim(q, ones, d, none, "l2", masked_doc_tokens="zero"), [[-2.0]])


def test_converted_collectivekd_colbert_scores_as_the_official_code(converted):
    """The converted colbert.dnn: v1 tokenisation (item 4: [MASK] not attended) and L2 MaxSim with zero vectors for
    punctuation and padding (item 3), equal to colbert/modeling/colbert.py on the same weights."""
    model = ColBERT.from_pretrained(converted).freeze()
    assert model.config["similarity"] == "l2" and model.config["attend_to_mask_tokens"] is False
    assert model.config["masked_doc_tokens"] == "zero" and model.config["dim"] == 16
    assert (model.config["query_max_length"], model.config["doc_max_length"]) == (12, 24)
    q_ids, q_att = v1_query_ids(model.tokenizer, QUERIES, 12)
    kq = model.tokenize(QUERIES, "query")
    assert kq["input_ids"].tolist() == q_ids.tolist() and kq["attention_mask"].tolist() == q_att.tolist()
    assert q_att[0].tolist() == [1] * 6 + [0] * 6  # [CLS] [Q] what cat sat [SEP], then 6 unattended [MASK]s
    d_ids, d_att = v1_doc_ids(model.tokenizer, DOCS, 24)
    kd = model.tokenize(DOCS, "doc")
    assert kd["input_ids"].tolist() == d_ids.tolist() and kd["attention_mask"].tolist() == d_att.tolist()
    cand = [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert close(model.score(QUERIES, DOCS, cand), v1_scores(model, QUERIES, DOCS))
    # kdir's own default (excluded tokens, attended [MASK]) is measurably different on the same weights
    other = ColBERT.from_pretrained(converted, masked_doc_tokens="exclude", attend_to_mask_tokens=True).freeze()
    assert not close(other.score(QUERIES, DOCS, cand), v1_scores(model, QUERIES, DOCS), atol=1e-2)


def test_collective_recipe_sets_the_official_colbert_for_teacher_and_student(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=collective_kd", "teacher.path=/t", "teacher.expansion=/e"])
    for node in (cfg.teacher, cfg.student):
        assert node.masked_doc_tokens == "zero" and node.attend_to_mask_tokens is False and node.similarity == "l2"


# ---------------------------------------------------------------- 5. TCT-ColBERT's teacher token set


def test_tct_teacher_token_layout_and_scores_as_the_original(bert_dir, tmp_path):
    """tfrecord_generation: "[CLS] [ q ] q [MASK]…" (36) / "[CLS] [ d ] d" (≤154), no [SEP], no punctuation mask;
    model_fn.py:57-66 drops the first 4 positions (32 query vectors), queries unnormalised, documents normalised,
    bias; loss.py:63 replaces zero logits (padding) by -15 before the max."""
    cfg = compose_cfg(tmp_path, ["teacher=tct_colbert", f"teacher.path={bert_dir}", "teacher.doc_max_length=12"])
    torch.manual_seed(5)
    model = instantiate(cfg.teacher)
    assert model.linear.bias is not None and model.config["dropout_when_frozen"] is True
    tok = model.tokenizer
    q = model.tokenize(QUERIES, "query")
    assert q["input_ids"].tolist() == [tct_ids(tok, t, "[Q]", 36, True) for t in QUERIES]
    assert q["attention_mask"].tolist() == [[1] * 36] * 2  # the [MASK] padding is attended (query_mask = 1)
    d = model.tokenize(DOCS, "doc")
    refs = [tct_ids(tok, t, "[D]", 12, False) for t in DOCS]
    assert [row[: len(r)] for row, r in zip(d["input_ids"].tolist(), refs)] == refs  # truncated to 12, no [SEP]
    assert d["attention_mask"].sum(1).tolist() == [len(r) for r in refs]
    model.eval()
    with torch.no_grad():
        q_emb, q_mask = model.encode(q, "query")
        assert q_mask.sum(1).tolist() == [32, 32] and not q_mask[:, :4].any()
        d_emb, d_mask = model.encode(d, "doc")
        assert d_mask.sum(1).tolist() == [len(r) - 4 for r in refs]  # punctuation kept
        # the original: slice [:, 4:], queries raw, documents normalised (padding stays zero), zero logits -> -15
        width = d["input_ids"].shape[1]
        hq = model.linear(model.bert(**q).last_hidden_state)[:, 4:]
        hd = model.linear(model.bert(**d).last_hidden_state)
        hd = F.normalize(hd * d["attention_mask"][..., None], dim=-1)[:, 4:width]
        logits = torch.einsum("qid,njd->qnij", hq, hd)
        logits = torch.where(logits == 0, torch.full_like(logits, -15.0), logits)
        expected = logits.max(-1).values.sum(-1)
    cand = [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert close(model.score(QUERIES, DOCS, cand), expected)


# ---------------------------------------------------------------- 6. Margin-MSE schedule, selection, clipping


def test_margin_mse_recipe_is_matchmakers_released_training(tmp_path):
    """matchmaker/train.py: cosine schedule (168), validation every 4,000 batches, EarlyStopping(patience 30, max)
    on validation nDCG@10 (184) honoured only after min_steps_training 300K (663), the best checkpoint (631-651,
    reloaded 694-712), clip_grad_norm_ 10,000 (515, 536)."""
    cfg = compose_cfg(tmp_path, ["experiment=margin_mse"])
    assert (cfg.optim.schedule, cfg.optim.warmup) == ("cosine", 100) and cfg.optim.optimizer.lr == pytest.approx(7e-6)
    t = cfg.trainer
    assert (t.max_steps, t.min_steps, t.val_check_interval, t.check_val_every_n_epoch) == (850000, 300000, 4000, None)
    assert t.gradient_clip_val == 10000 and t.max_epochs == 25
    es = cfg.callbacks.early_stopping
    assert (es.monitor, es.mode, es.patience) == ("val/nDCG@10", "max", 30)
    ckpt = cfg.callbacks.model_checkpoint
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k) == ("val/nDCG@10", "max", 1)  # the best is tested
    assert instantiate(es).patience == 30


def test_cosine_schedule_follows_matchmakers_100_batch_steps(tiny_student):
    """get_cosine_schedule_with_warmup(optimizer, 1, 8500) stepped after every 100th batch (train.py:168, 552-553):
    batch i runs at c = floor((i - 1) / 100) scheduler steps, lr = lr0·0.5·(1 + cos(π (c - 1) / 8499)) once c ≥ 1."""
    import pytorch_lightning as pl

    from kdir.losses import MarginMSE
    from kdir.training.module import DistillModule

    lr0 = 7e-6
    module = DistillModule(tiny_student, MarginMSE(), functools.partial(torch.optim.Adam, lr=lr0), 100,
                           schedule="cosine")  # fmt: skip
    module.trainer = pl.Trainer(max_epochs=-1, max_steps=850_000, logger=False, enable_checkpointing=False)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lam = sched.lr_lambdas[0]

    def matchmaker(i: int) -> float:
        c = max(0, (i - 1) // 100)
        return 0.0 if c < 1 else lr0 * 0.5 * (1 + math.cos(math.pi * (c - 1) / 8499))

    for i in (201, 1_000, 4_000, 300_000, 425_050, 849_999):
        assert abs(lr0 * lam(i) - matchmaker(i)) <= lr0 * 2e-4, i  # at most one 100-batch stair apart
    assert lam(50) == pytest.approx(0.5) and matchmaker(50) == 0.0  # the first 100 batches: warm-up vs lr 0


# ---------------------------------------------------------------- 8. HN / HN+ data flow


def test_hnp_pipeline_composes_every_stage_on_ms_marco(tmp_path):
    """Stage 1 on the official BM25 triples (fixed triples, no sampler), stages 3-4 on the qrels with one negative
    drawn from the mined top-200, labelled positives not filtered (hard_triplet_construct.py)."""
    stages = hnp_stage_commands(MSMARCO)
    assert list(stages) == ["0_teacher", "1_student", "2_mine", "3_teacher_hnp", "4_student_hnp"]
    cfgs = {name: compose_stage(tmp_path, cmd) for name, cmd in stages.items()}
    for name in ("0_teacher", "1_student"):
        assert cfgs[name].data.examples._target_.endswith("TripleExamples") and cfgs[name].negatives is None
    assert cfgs["2_mine"].data.train.queries.endswith("queries.train.tsv") and cfgs["2_mine"].depth == 200
    for name in ("3_teacher_hnp", "4_student_hnp"):
        c = cfgs[name]
        assert c.data.examples._target_ == "kdir.data.examples.QrelsExamples" and c.data.examples.n_negatives == 1
        assert c.negatives.path == "/runs/hnp/hn.trec" and c.negatives.depth == 200
        assert c.negatives.exclude_positives is False
    assert cfgs["4_student_hnp"].teacher.path == "/runs/hnp/teacher_hnp/teacher"
    hn = hnp_stage_commands(MSMARCO | {"VARIANT": "hn"})
    assert "3_teacher_hnp" not in hn and compose_stage(tmp_path, hn["4_student_hn"]).teacher.path.endswith(
        "/runs/hnp/teacher/teacher"
    )


# ---------------------------------------------------------------- 9. released artefacts


def test_colbert_v1_checkpoint_converts_to_a_kdir_folder(converted, colbert_dnn, base, tmp_path):
    model = ColBERT.from_pretrained(converted)
    ckpt = torch.load(colbert_dnn, weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["model_state_dict"].items()}
    assert torch.equal(model.linear.weight, state["linear.weight"]) and model.linear.bias is None
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, state[f"bert.{k}"]), k
    assert (converted / "colbert_linear.safetensors").is_file() and (converted / "kdir_model.json").is_file()
    # an existing folder is refused (one line, exit status 2); a file that is not a checkpoint too
    res = run_cli("kdir.models.released", "colbert-v1", "--checkpoint", str(colbert_dnn), "--base", str(base),
                  "--out", str(converted))  # fmt: skip
    assert res.returncode == 2 and "exists and is not empty" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.dnn"
    torch.save({"weights": torch.zeros(2)}, bad)
    assert main(["colbert-v1", "--checkpoint", str(bad), "--base", str(base), "--out", str(tmp_path / "o")]) == 2


def test_collective_knowledge_converts_and_scores_as_the_official_teacher(converted, tmp_path):
    """collective_knowledge.pt → expansion store; the teacher's score = colbert.py score() with Q_exp (weights 1 for
    the query tokens, w_k for the expansions) over the zero-masked documents."""
    torch.manual_seed(7)
    embs = {101: torch.randn(3, 16) * 0.5, 202: torch.randn(2, 16) * 0.5}  # 202: fewer expansions (padded)
    weights = {101: torch.tensor([2.0, 1.5, 0.5]), 202: torch.tensor([1.0, 0.25])}
    tokens = {101: ["cat", "mat", "sat"], 202: ["dog", "lazy"]}
    file = tmp_path / "collective_knowledge.pt"
    torch.save({"qid_to_embs": embs, "qid_to_weights": weights, "qid_to_tokens": tokens}, file)
    out = tmp_path / "expansion"
    assert main(["collective-knowledge", "--file", str(file), "--out", str(out), "--teacher", str(converted)]) == 0
    store = ExpansionStore.open(out)
    vec, w = store.lookup(id_hashes(["101", "202"]))
    assert close(vec[0], embs[101]) and close(vec[1, :2], embs[202]) and not vec[1, 2].any()
    assert close(w[0], weights[101]) and close(w[1], [1.0, 0.25, 0.0])
    assert store.lookup_tokens(id_hashes(["202"])) == [["dog", "lazy", ""]]
    teacher = CollectiveColBERT.from_pretrained(converted, expansion=out).freeze()
    cand = [[0, 1, 2, 3], [0, 1, 2, 3]]
    scores = teacher.score(QUERIES, DOCS, cand, query_keys=id_hashes(["101", "202"]))
    expected = v1_scores(teacher, QUERIES, DOCS, torch.from_numpy(vec), torch.from_numpy(w))
    assert close(scores, expected)


@pytest.fixture(scope="module")
def tct_hub(base, tmp_path_factory) -> Path:
    """A released TCT-ColBERT encoder's layout: BERT weights under ``bert.`` plus pre-training heads ``cls.*``."""
    out = tmp_path_factory.mktemp("tct_hub")
    torch.manual_seed(11)
    BertForPreTraining(BertConfig.from_pretrained(base)).save_pretrained(out)
    BertTokenizerFast.from_pretrained(base).save_pretrained(out)
    return out


@torch.no_grad()
def pyserini_encode(folder: Path, text: str, side: str) -> torch.Tensor:
    """pyserini/encode/_tct_colbert.py: queries '[CLS] [Q] ' + q + '[MASK]' * 36 truncated to 36, mean over 4..
    (123-136); documents '[CLS] [D] ' + d, no special tokens, mean over 4.. with the attention mask (76-103)."""
    tok, bert = BertTokenizerFast.from_pretrained(folder), BertModel.from_pretrained(folder).eval()
    if side == "query":
        inputs = tok("[CLS] [Q] " + text + "[MASK]" * 36, max_length=36, truncation=True, add_special_tokens=False,
                     return_tensors="pt")  # fmt: skip
        return bert(**inputs).last_hidden_state[0, 4:].mean(0)
    inputs = tok(["[CLS] [D] " + text], max_length=512, padding="longest", truncation=True, add_special_tokens=False,
                 return_tensors="pt")  # fmt: skip
    hidden, mask = bert(**inputs).last_hidden_state[:, 4:], inputs["attention_mask"][:, 4:, None].float()
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))[0]


def test_tct_colbert_release_converts_with_pyserinis_query_encoding(tct_hub, tmp_path):
    out = convert_tct_colbert(tct_hub, tmp_path / "tct")
    student = DualEncoder.from_pretrained(out).eval()
    assert (student.config["skip_tokens"], student.config["query_max_length"]) == (4, 36)
    with torch.no_grad():
        for q in QUERIES:
            mine = student.encode(student.query_formatter([q]), "query")[0]
            assert close(mine, pyserini_encode(tct_hub, q, "query"))
    # as a teacher: the same folder, its settings read back
    assert DualEncoder.from_pretrained(out).config == student.config


def test_tct_colbert_release_documents_encode_as_pyserini(tct_hub, tmp_path):
    out = convert_tct_colbert(tct_hub, tmp_path / "tct")
    student = DualEncoder.from_pretrained(out).eval()
    with torch.no_grad():
        for d in DOCS:
            assert close(student.encode(student.doc_formatter([d]), "doc")[0], pyserini_encode(tct_hub, d, "doc"))


# ---------------------------------------------------------------- 10. minor: Keras KL clipping, teacher dropout


def test_kl_with_keras_probability_clipping_by_hand():
    """tf.keras.losses.KLDivergence: y = clip(y, 1e-7, 1) for both, Σ y_t log(y_t / y_s), mean over the batch."""
    from kdir.losses import kl_divergence

    t = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, -30.0]])  # row 0: the student gives 2 candidates < 1e-7
    s = torch.tensor([[20.0, 0.0, -5.0], [0.0, 1.0, 3.0]])
    pt = np.clip(torch.softmax(t / 0.25, -1).double().numpy(), 1e-7, 1)
    ps = np.clip(torch.softmax(s, -1).double().numpy(), 1e-7, 1)
    expected = (pt * np.log(pt / ps)).sum(-1).mean()
    got = kl_divergence(s, t, prob_clip=1e-7).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(kl_divergence(s, t).item(), rel=1e-3)  # the clip matters on these rows


def test_tct_teacher_labels_with_dropout_but_scores_and_saves_deterministically(bert_dir, tmp_path):
    teacher = ColBERT(bert_dir, dim=8, dropout_when_frozen=True).freeze()
    assert teacher.training and not any(p.requires_grad for p in teacher.parameters())
    inputs = teacher.prepare(QUERIES, DOCS, [[0, 1], [2, 3]])
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = teacher(inputs), teacher(inputs)  # as the online signal calls it: dropout on
    assert not torch.equal(a, b)
    assert torch.equal(teacher.score(QUERIES, DOCS, [[0, 1], [2, 3]]), teacher.score(QUERIES, DOCS, [[0, 1], [2, 3]]))
    teacher.save_pretrained(tmp_path / "t")
    assert ColBERT.from_pretrained(tmp_path / "t").freeze().training is False  # not a property of the weights
