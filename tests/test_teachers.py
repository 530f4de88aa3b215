"""Teacher models: MaxSim, ColBERT tokenisation and checkpoint layouts, cross-encoder pairs and dual pooling,
ensembles, freezing and weights hashes. Tiny random BERTs built offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from kdir.models import ColBERT, CrossEncoder, DualEncoder, Ensemble, Scorer, maxsim
from kdir.models.base import as_candidates
from kdir.retrieval.encode import encode_texts

SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a cat dog sat on mat red blue fox quick brown jumps over lazy what who where is house runs".split()
PUNCT = [".", ",", "!", "?"]
QUERIES = ["what cat sat", "who jumps over the lazy dog"]
DOCS = ["the cat sat on the mat .", "a quick brown fox , jumps !", "the red house", "blue dog runs ?", "the mat"]
CANDIDATES = [[0, 2, 3], [3, 1, 1]]  # a repeated candidate on purpose


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-d BERT (dropout on) and its WordPiece tokenizer."""
    from transformers import BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL + WORDS + PUNCT)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def colbert(bert_dir) -> ColBERT:
    torch.manual_seed(1)
    return ColBERT(bert_dir, dim=8).freeze()


@pytest.fixture(scope="module")
def cross_encoder(bert_dir) -> CrossEncoder:
    torch.manual_seed(2)
    return CrossEncoder(bert_dir, query_max_length=8, max_length=24).freeze()


def close(a, b, atol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


# ---------------------------------------------------------------- MaxSim


def test_maxsim_cosine_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 2 queries × 2 tokens
    d = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], [[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]])  # 2 docs × 3
    ones_q, ones_d = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    # q0: doc0 max(1, .6, 0) + max(0, .8, -1) = 1.8; doc1 max(0, -1, 1) + max(1, 0, 0) = 2; q1: 2 × .8, 2 × 1
    assert close(maxsim(q, ones_q, d, ones_d), [[1.8, 2.0], [1.6, 2.0]])
    d_mask = torch.tensor([[True, False, True], [True, True, False]])  # punctuation / padding positions
    # q0: doc0 max(1, 0) + max(0, -1) = 1; doc1 max(0, -1) + max(1, 0) = 1; q1: 2 × 0, 2 × 1
    assert close(maxsim(q, ones_q, d, d_mask), [[1.0, 1.0], [0.0, 2.0]])
    q_mask = torch.tensor([[True, False], [True, True]])  # q0's second token left out
    assert close(maxsim(q, q_mask, d, ones_d, chunk_size=1), [[1.0, 1.0], [1.6, 2.0]])


def test_maxsim_l2_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    d = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    # squared distances: q0 → (1, 10, 1), q1 → (5, 4, 1): -1 + -1
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, torch.ones(1, 3, dtype=torch.bool), "l2"), [[-2.0]])
    d_mask = torch.tensor([[True, True, False]])  # without (1, 1): -1 + -4
    assert close(maxsim(q, torch.ones(1, 2, dtype=torch.bool), d, d_mask, "l2"), [[-5.0]])


# ---------------------------------------------------------------- ColBERT


def test_colbert_query_tokenisation(colbert, bert_dir):
    vocab = colbert.tokenizer.get_vocab()
    long_query = " ".join(["cat"] * 40)
    q = colbert.tokenize(["what cat sat", long_query], "query")
    ids, att = q["input_ids"], q["attention_mask"]
    assert ids.shape == (2, 32) and att.tolist() == [[1] * 32] * 2
    assert ids[:, 0].tolist() == [vocab["[CLS]"]] * 2 and ids[:, 1].tolist() == [vocab["[unused0]"]] * 2
    assert ids[0, :6].tolist() == [vocab[t] for t in ["[CLS]", "[unused0]", "what", "cat", "sat", "[SEP]"]]
    assert ids[0, 6:].tolist() == [vocab["[MASK]"]] * 26
    assert ids[1, 2:31].tolist() == [vocab["cat"]] * 29 and ids[1, 31].item() == vocab["[SEP]"]  # truncated
    # the reference ColBERTv2 behaviour: [MASK] embedded but not attended to
    plain = ColBERT(bert_dir, dim=8, attend_to_mask_tokens=False)
    q2 = plain.tokenize(["what cat sat"], "query")
    assert q2["input_ids"].tolist() == ids[:1].tolist() and q2["attention_mask"][0].tolist() == [1] * 6 + [0] * 26
    emb, mask = plain.encode(q2, "query")
    assert emb.shape == (1, 32, 8) and mask.all()


def test_colbert_doc_tokenisation_and_punctuation_mask(colbert):
    vocab = colbert.tokenizer.get_vocab()
    d = colbert.tokenize(["the cat . sat , !", " ".join(["dog"] * 300)], "doc")
    ids, att = d["input_ids"], d["attention_mask"]
    assert ids.shape == (2, 180) and ids[:, 1].tolist() == [vocab["[unused1]"]] * 2
    tokens = ["[CLS]", "[unused1]", "the", "cat", ".", "sat", ",", "!", "[SEP]"]
    assert ids[0, :9].tolist() == [vocab[t] for t in tokens] and att[0].tolist() == [1] * 9 + [0] * 171
    assert ids[1, 179].item() == vocab["[SEP]"] and att[1].all()  # truncated to 180
    with torch.no_grad():
        emb, mask = colbert.encode(d, "doc")
    assert mask[0].tolist() == [True, True, True, True, False, True, False, False, True] + [False] * 171
    assert mask[1].all()
    assert close(emb.norm(dim=-1), torch.ones(2, 180))


def test_colbert_full_matrix_equals_per_pair(colbert):
    docs = DOCS
    cand = [[0, 2, 4], [3, 1, 1]]
    inputs = colbert.prepare(QUERIES, docs, cand)
    assert inputs["doc_input_ids"].shape[0] == len(DOCS)  # each (distinct) document tokenised once
    assert inputs["candidates"].tolist() == cand
    scores = colbert.score(QUERIES, docs, cand)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    for i, row in enumerate(cand):
        for j, c in enumerate(row):
            single = colbert.score([QUERIES[i]], [docs[c]], [[0]])
            assert close(scores[i, j], single[0, 0])
            with torch.no_grad():  # MaxSim by hand over this pair's token embeddings
                q, _ = colbert.encode(colbert.tokenize([QUERIES[i]], "query"), "query")
                d, dm = colbert.encode(colbert.tokenize([docs[c]], "doc"), "doc")
            sims = q[0] @ d[0][dm[0]].T
            assert close(scores[i, j], sims.max(dim=1).values.sum())


def test_colbert_round_trip(colbert, tmp_path):
    colbert.save_pretrained(tmp_path / "cb")
    assert (tmp_path / "cb" / "colbert_linear.safetensors").is_file()
    back = ColBERT.from_pretrained(tmp_path / "cb")
    assert back.config == colbert.config and back.weights_hash() == colbert.weights_hash()
    assert close(back.score(QUERIES, DOCS, CANDIDATES), colbert.score(QUERIES, DOCS, CANDIDATES))
    l2 = ColBERT.from_pretrained(tmp_path / "cb", similarity="l2")
    assert (l2.score(QUERIES, DOCS, CANDIDATES) <= 0).all()


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_colbert_loads_published_layout(colbert, tmp_path, weights_file):
    folder = tmp_path / "published"
    colbert.bert.config.save_pretrained(folder)
    colbert.tokenizer.save_pretrained(folder)
    state = {f"bert.{k}": v.clone() for k, v in colbert.bert.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)  # published checkpoints carry BERT's pooler
    state["linear.weight"] = colbert.linear.weight.detach().clone()
    if weights_file.endswith(".safetensors"):
        save_file(state, folder / weights_file)
    else:
        torch.save(state, folder / weights_file)
    loaded = ColBERT(folder)  # dim comes from linear.weight
    assert loaded.config["dim"] == 8
    assert loaded.weights_hash() == colbert.weights_hash()
    assert close(loaded.score(QUERIES, DOCS, CANDIDATES), colbert.score(QUERIES, DOCS, CANDIDATES))


# ---------------------------------------------------------------- cross-encoder


def test_cross_encoder_equals_manual_sequence_classification(cross_encoder, tmp_path):
    cross_encoder.save_pretrained(tmp_path / "ce")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ce")
    scores = cross_encoder.score(QUERIES, DOCS, CANDIDATES)
    with torch.no_grad():
        for i, row in enumerate(CANDIDATES):
            for j, c in enumerate(row):
                enc = tok(QUERIES[i], DOCS[c], return_tensors="pt")
                assert close(scores[i, j], model(**enc).logits[0, 0])
    back = CrossEncoder.from_pretrained(tmp_path / "ce")
    assert back.config == cross_encoder.config and close(back.score(QUERIES, DOCS, CANDIDATES), scores)


def test_cross_encoder_runs_only_candidate_pairs_and_truncates_documents(cross_encoder):
    rows = []

    def count(module, args, kwargs, out):
        rows.append(kwargs["input_ids"].shape[0])

    hook = cross_encoder.model.register_forward_hook(count, with_kwargs=True)
    try:
        cross_encoder.score(QUERIES, DOCS * 4, CANDIDATES)  # 20 documents, 2 × 3 candidates
    finally:
        hook.remove()
    assert rows == [6]
    long_query, long_doc = " ".join(["cat"] * 20), " ".join(["dog"] * 50)
    inputs = cross_encoder.prepare([long_query], [long_doc, "the mat"], [[0, 1]])
    assert inputs["input_ids"].shape == (2, 24)  # max_length: pair truncated
    # segment A = [CLS] + 8 query tokens (query_max_length) + [SEP]; the document fills the rest
    assert inputs["token_type_ids"][0].tolist() == [0] * 10 + [1] * 14
    assert inputs["input_ids"][0, -1].item() == cross_encoder.tokenizer.sep_token_id


def test_cross_encoder_dual_pooling(bert_dir):
    ce = CrossEncoder(bert_dir, query_max_length=16, max_length=32, dual_pooling=True).freeze()
    tok = ce.tokenizer
    inputs = ce.prepare(QUERIES, DOCS, CANDIDATES)
    with torch.no_grad():
        e_q, e_d = ce.embed_pairs(inputs)
        scores = ce(inputs)
    assert e_q.shape == e_d.shape == (2, 3, 32)
    with torch.no_grad():
        for i, row in enumerate(CANDIDATES):
            for j, c in enumerate(row):
                nq, nd = len(tok.tokenize(QUERIES[i])), len(tok.tokenize(DOCS[c]))
                hidden = ce.model(**tok(QUERIES[i], DOCS[c], return_tensors="pt")).last_hidden_state[0]
                assert hidden.shape[0] == nq + nd + 3  # [CLS] q [SEP] d [SEP]
                q_mean, d_mean = hidden[1 : 1 + nq].mean(0), hidden[2 + nq : 2 + nq + nd].mean(0)
                assert close(e_q[i, j], q_mean) and close(e_d[i, j], d_mean)
                assert close(scores[i, j], q_mean @ d_mean, atol=1e-4)


# ---------------------------------------------------------------- bi-encoder


def test_bi_encoder_scores(bert_dir, tmp_path):
    bi = DualEncoder(bert_dir, pooling="mean", query_max_length=16, doc_max_length=32).freeze()
    docs = DOCS
    inputs = bi.prepare(QUERIES, docs, [[0, 3], [3, 3]])
    assert inputs["doc"]["input_ids"].shape[0] == len(DOCS)
    scores = bi.score(QUERIES, docs, [[0, 3], [3, 3]])
    (q,), (d,) = encode_texts(bi, QUERIES, "query"), encode_texts(bi, [docs[0], docs[3]], "doc")
    assert close(scores, [[q[0] @ d[0], q[0] @ d[1]], [q[1] @ d[1], q[1] @ d[1]]])
    bi.save_pretrained(tmp_path / "bi")
    back = DualEncoder.from_pretrained(tmp_path / "bi")
    assert back.config == bi.config and close(back.score(QUERIES, docs, [[0, 3], [3, 3]]), scores)
    assert AutoModel.from_pretrained(tmp_path / "bi").config.hidden_size == 32


# ---------------------------------------------------------------- ensemble


class TableTeacher(Scorer):
    """Scores read from a fixed ``[B, D]`` table (a stand-in member with known scores)."""

    name = "table"

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))
        self.config = {}

    def preparer(self):
        return lambda queries, docs, candidates: {"candidates": as_candidates(candidates, len(queries), len(docs))}

    def forward(self, inputs):
        return self.table.gather(1, inputs["candidates"])

    def _save(self, path):  # pragma: no cover - not saved in tests
        raise NotImplementedError


def test_ensemble_mean_and_weighted_mean(colbert, cross_encoder, bert_dir, tmp_path):
    bi = DualEncoder(bert_dir, query_max_length=16, doc_max_length=32).freeze()
    members = {"ce": cross_encoder, "cb": colbert, "bi": bi}
    each = {name: m.score(QUERIES, DOCS, CANDIDATES) for name, m in members.items()}
    ens = Ensemble(members)
    inputs = ens.prepare(QUERIES, DOCS, CANDIDATES)
    assert {k.split(".")[0] for k in inputs} == {"ce", "cb", "bi"} and "cb.doc_input_ids" in inputs
    assert close(ens.score(QUERIES, DOCS, CANDIDATES), (each["ce"] + each["cb"] + each["bi"]) / 3)
    weighted = Ensemble([cross_encoder, colbert, bi], weights=[1.0, 2.0, 3.0])
    expected = (each["ce"] + 2 * each["cb"] + 3 * each["bi"]) / 6
    assert close(weighted.score(QUERIES, DOCS, CANDIDATES), expected)
    ens.save_pretrained(tmp_path / "ens")
    back = Ensemble.from_pretrained(tmp_path / "ens")
    assert isinstance(back.members["cb"], ColBERT) and back.weights_hash() == ens.weights_hash()
    assert close(back.score(QUERIES, DOCS, CANDIDATES), ens.score(QUERIES, DOCS, CANDIDATES))


def test_ensemble_zscore_hand_computed():
    a = TableTeacher([[1.0, 2.0], [3.0, 4.0]])  # mean 2.5, std √1.25: z = (-3, -1, 1, 3) / √5
    b = TableTeacher([[10.0, 10.0], [10.0, 30.0]])  # mean 15, std √75: z = (-1, -1, -1, 3) / √3
    cand = [[0, 1], [0, 1]]
    s5, s3 = math.sqrt(5), math.sqrt(3)
    expected = [[(-3 / s5 - 1 / s3) / 2, (-1 / s5 - 1 / s3) / 2], [(1 / s5 - 1 / s3) / 2, (3 / s5 + 3 / s3) / 2]]
    assert close(Ensemble([a, b], normalize="zscore").score(["q1", "q2"], ["d1", "d2"], cand), expected)
    assert close(Ensemble([a, b]).score(["q1", "q2"], ["d1", "d2"], cand), [[5.5, 6.0], [6.5, 17.0]])
    assert close(Ensemble([a, b], weights=[3, 1]).score(["q1", "q2"], ["d1", "d2"], cand), [[3.25, 4.0], [4.75, 10.5]])


# ---------------------------------------------------------------- freezing and provenance


@pytest.mark.parametrize("kind", ["colbert", "cross_encoder", "dual_pooling", "bi_encoder"])
def test_training_gradients_then_freeze(bert_dir, kind):
    torch.manual_seed(3)
    teacher = {
        "colbert": lambda: ColBERT(bert_dir, dim=8),
        "cross_encoder": lambda: CrossEncoder(bert_dir, query_max_length=16, max_length=32),
        "dual_pooling": lambda: CrossEncoder(bert_dir, query_max_length=16, max_length=32, dual_pooling=True),
        "bi_encoder": lambda: DualEncoder(bert_dir, doc_max_length=32),
    }[kind]()
    inputs = teacher.prepare(QUERIES, DOCS, CANDIDATES)
    teacher.train()
    scores = teacher(inputs)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32 and scores.requires_grad
    scores.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())
    assert teacher.freeze() is teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    first, second = teacher(inputs), teacher(inputs)  # dropout off
    assert not first.requires_grad and torch.equal(first, second)


def test_weights_hash_changes_with_weights(bert_dir):
    torch.manual_seed(4)
    cb = ColBERT(bert_dir, dim=8)
    before = cb.weights_hash()
    assert len(before) == 64 and before == cb.weights_hash()
    with torch.no_grad():
        cb.bert.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    changed = cb.weights_hash()
    assert changed != before
    with torch.no_grad():
        cb.linear.weight[0, 0] += 1.0
    assert cb.weights_hash() not in (before, changed)


def test_colbert_provenance_records_later_settings_only_when_they_change_scores(bert_dir):
    """Stores scored before masked_doc_tokens / marker_as_text / add_sep / skip_prefix_tokens / dropout_when_frozen
    existed recorded none of them: a ColBERT at their earlier fixed values has the same provenance keys."""
    plain = ColBERT(bert_dir, dim=8).provenance()["config"]
    assert not {"masked_doc_tokens", "marker_as_text", "add_sep", "skip_prefix_tokens", "dropout_when_frozen"} & set(
        plain
    )
    assert set(plain) == {
        "dim",
        "similarity",
        "query_max_length",
        "doc_max_length",
        "mask_punctuation",
        "attend_to_mask_tokens",
        "query_marker",
        "doc_marker",
        "normalize_queries",
        "bias",
    }
    tct = ColBERT(bert_dir, dim=8, masked_doc_tokens=-15.0, add_sep=False, skip_prefix_tokens=4).provenance()["config"]
    assert (tct["masked_doc_tokens"], tct["add_sep"], tct["skip_prefix_tokens"]) == (-15.0, False, 4)
