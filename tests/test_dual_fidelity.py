"""Dual encoders against the original code's formulas, computed by hand on hand-built inputs.

* EmbedDistill's asymmetric student (Kim et al. 2023): its frozen document side is the teacher's document encoder
  (tower, tokenizer, pooling, length, prefix, layout, projection, similarity), for kdir and sentence-transformers
  teachers, shared or separate; training leaves it bit-identical; any disagreement is a ConfigError.
* TCT-ColBERT's token layout (castorini/tct_colbert ``tfrecord_generation/tokenization.py: convert_to_colbert_input``;
  castorini/pyserini ``pyserini/encode/_tct_colbert.py``): ``[CLS] [ d ] d`` with no ``[SEP]``, queries ``[CLS] [ q ]
  q [MASK]...`` of 36, mean over positions 4...
* Released checkpoints: TCT-ColBERT (``castorini/tct_colbert-msmarco``: BERT weights under ``bert.`` with pre-training
  heads ``cls.*``) and BERT_Dot (``sebastian-hofstaetter/distilbert-dot-margin_mse-T2-msmarco``: a plain
  DistilBertModel, CLS vector, no projection, dot product; matchmaker ``models/bert_dot.py``) on tiny folders of the
  same layout, read as students (the student configs) and teachers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForPreTraining,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertModel,
)

from kdir.errors import ConfigError
from kdir.models import DualEncoder

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MARKERS = ["[", "]", "q", "d"]  # BERT's word pieces of the literal "[Q] " / "[D] "
WORDS = (
    "what is dna a molecule which proteins fold into in helix the cell membrane long document about passage".split()
)
VOCAB = {t: i for i, t in enumerate(SPECIAL + MARKERS + WORDS)}
QUERIES = ["what is dna", "which proteins fold into a helix", "what is " * 30]  # the last: past 36 tokens
DOCS = ["dna is a molecule", "proteins fold into a helix in the cell membrane", "a long document about dna " * 40]


def _close(a, b, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=atol, rtol=0)


def _bert(seed: int, hidden: int = 32) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    return BertModel(config, add_pooling_layer=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny towers with one uncased WordPiece vocabulary: two BERTs (32-d, 48-d), a TCT-ColBERT release layout and a
    BERT_Dot release layout."""
    root = tmp_path_factory.mktemp("dual_fidelity")
    tok = BertTokenizerFast(vocab=VOCAB, do_lower_case=True)
    out = {name: root / name for name in ("bert", "bert48", "tct_hub", "bert_dot_hub")}
    _bert(0).save_pretrained(out["bert"])
    _bert(1, 48).save_pretrained(out["bert48"])
    torch.manual_seed(2)  # castorini/tct_colbert-msmarco: BertForPreTraining (bert.* + cls.* heads), vocab.txt
    BertForPreTraining(_bert(2).config).save_pretrained(out["tct_hub"])
    torch.manual_seed(3)  # the T2 BERT_Dot: config.json (DistilBertModel), pytorch_model.bin, vocab.txt
    dot = DistilBertModel(DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    dot.save_pretrained(out["bert_dot_hub"])
    (out["bert_dot_hub"] / "model.safetensors").unlink()
    torch.save(dot.state_dict(), out["bert_dot_hub"] / "pytorch_model.bin")
    for folder in out.values():
        tok.save_pretrained(folder)
    (out["bert_dot_hub"] / "tokenizer.json").unlink()  # the release has vocab.txt and tokenizer_config.json only
    return out


def _ids(tokens: list[str]) -> list[int]:
    return [VOCAB[t] for t in tokens]


@torch.no_grad()
def _mean_from_4(folder: Path, ids: list[int]) -> torch.Tensor:
    """TCT-ColBERT's pooling of one text: the mean of the BERT states at positions 4.. (all attended)."""
    return (
        BertModel.from_pretrained(folder, add_pooling_layer=False)
        .eval()(input_ids=torch.tensor([ids]))
        .last_hidden_state[0, 4:]
        .mean(0)
    )


# ------------------------------------------------------------------ A. EmbedDistill: the teacher's document encoder
def _hand_doc(teacher: Path, doc: str, kind: str) -> torch.Tensor:
    """Each teacher's document embedding from its own files and its formula (below)."""
    with torch.no_grad():
        if kind == "shared_cls_projected_cosine":  # CLS of "passage " + d (10 tokens) → W x + b → L2 normalise
            tok = AutoTokenizer.from_pretrained(teacher)
            inputs = tok(["passage " + doc], max_length=10, truncation=True, return_tensors="pt")
            cls = AutoModel.from_pretrained(teacher).eval()(**inputs).last_hidden_state[0, 0]
            w = load_file(teacher / "projection.safetensors")
            return torch.nn.functional.normalize(w["query.weight"] @ cls + w["query.bias"], dim=-1)
        if kind == "separate_mean":  # its doc/ tower: mean over "[D] " + d (7 tokens, [CLS] ... [SEP])
            tok = AutoTokenizer.from_pretrained(teacher / "doc")
            inputs = tok(["[D] " + doc], max_length=7, truncation=True, return_tensors="pt")
            return AutoModel.from_pretrained(teacher / "doc").eval()(**inputs).last_hidden_state[0].mean(0)
        # tct_layout: [CLS] [ d ] + d's word pieces, 12 in all, no [SEP], mean over 4..
        return _mean_from_4(teacher, _ids(["[CLS]", "[", "d", "]", *doc.split()])[:12])


TEACHERS = {
    "shared_cls_projected_cosine": lambda f: DualEncoder(
        f["bert48"], pooling="cls", projection_dim=16, similarity="cosine", doc_max_length=10, doc_prefix="passage "
    ),
    "separate_mean": lambda f: DualEncoder(
        f["bert"], shared=False, doc_model_name_or_path=f["bert48"], doc_max_length=7, doc_prefix="[D] "
    ),
    "tct_layout": lambda f: DualEncoder(
        f["bert"], skip_tokens=4, add_sep=False, doc_prefix="[D] ", doc_max_length=12, query_max_length=12
    ),
}


@pytest.fixture(scope="module")
def teachers(folders, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {name: build(folders).save_pretrained(root / name) for name, build in TEACHERS.items()}


def _asym(folders, teacher: Path, **settings) -> DualEncoder:
    return DualEncoder(
        folders["bert"], shared=False, freeze_doc_encoder=True, doc_model_name_or_path=teacher, **settings
    ).eval()


def _encode(model: DualEncoder, texts: list[str], side: str) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(model.formatter(side)(texts), side)


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_frozen_document_side_is_the_teachers_document_encoder(folders, teachers, kind, tmp_path):
    teacher_dir = teachers[kind]
    student = _asym(folders, teacher_dir, pooling="mean", query_max_length=8)
    teacher = DualEncoder.from_pretrained(teacher_dir).eval()
    mine = _encode(student, DOCS, "doc")
    _close(mine, _encode(teacher, DOCS, "doc"))
    for row, doc in zip(mine, DOCS):
        _close(row, _hand_doc(teacher_dir, doc, kind), atol=1e-5)
    assert student.config["similarity"] == teacher.config["similarity"]

    # saved and read back (kdir folder, then its sentence-transformers files): still the teacher's
    path = student.save_pretrained(tmp_path / "student")
    back = DualEncoder.from_pretrained(path).eval()
    assert back.config == student.config
    _close(_encode(back, DOCS, "doc"), mine)
    st = SentenceTransformer(str(path), device="cpu", trust_remote_code=True)
    _close(st.encode_document(DOCS, convert_to_tensor=True), mine, atol=1e-5)
    _close(st.encode_query(QUERIES, convert_to_tensor=True), _encode(student, QUERIES, "query"), atol=1e-5)


def test_a_projected_shared_teacher_gives_its_projection_and_the_query_side_is_projected_to_it(folders, teachers):
    student = _asym(folders, teachers["shared_cls_projected_cosine"])
    cfg = student.config
    assert (cfg["doc_pooling"], cfg["doc_max_length"], cfg["doc_prefix"]) == ("cls", 10, "passage ")
    assert (cfg["similarity"], cfg["doc_projection_dim"], cfg["projection_dim"]) == ("cosine", 16, 16)
    assert student.query_projection.weight.shape == (16, 32) and student.doc_projection.weight.shape == (16, 48)
    assert (cfg["pooling"], cfg["query_max_length"]) == ("mean", 32)  # the query side stays the student's


def test_a_separate_tower_teacher_gives_its_doc_tower_not_its_query_tower(folders, teachers):
    student = _asym(folders, teachers["separate_mean"])
    doc_tower = AutoModel.from_pretrained(teachers["separate_mean"] / "doc").state_dict()
    mine = student.doc_encoder.state_dict()
    assert student.doc_encoder.config.hidden_size == 48
    assert all(torch.equal(mine[k], v) for k, v in doc_tower.items() if k in mine)


def test_a_sentence_transformers_teacher_is_read_by_its_modules(folders, teachers, tmp_path):
    st_only = tmp_path / "st_teacher"  # the same teacher as sentence-transformers files only
    shutil.copytree(
        teachers["shared_cls_projected_cosine"],
        st_only,
        ignore=shutil.ignore_patterns("kdir_model.json", "projection.safetensors"),
    )
    student = _asym(folders, st_only)
    assert (student.config["doc_pooling"], student.config["doc_projection_dim"]) == ("cls", 16)
    for row, doc in zip(_encode(student, DOCS, "doc"), DOCS):
        _close(row, _hand_doc(teachers["shared_cls_projected_cosine"], doc, "shared_cls_projected_cosine"), 1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"similarity": "dot"}, r"similarity: the student sets 'dot' but .*teacher.* has 'cosine'"),
        ({"doc_max_length": 99}, r"doc_max_length: the student sets 99 but .* has 10"),
        ({"doc_pooling": "mean"}, r"doc_pooling: the student sets 'mean' but .* has 'cls'"),
        ({"doc_prefix": ""}, r"doc_prefix: the student sets '' but .* has 'passage '"),
        ({"projection_dim": 32}, r"projection_dim=32 must equal the frozen document side's size 16"),
    ],
)
def test_disagreeing_with_the_teacher_is_a_config_error_naming_both(folders, teachers, settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        _asym(folders, teachers["shared_cls_projected_cosine"], **settings)
    assert "leave" in str(info.value) or "projection_dim" in settings


def test_training_steps_leave_the_document_side_bit_identical(folders, teachers):
    student = _asym(folders, teachers["shared_cls_projected_cosine"]).train()
    assert student.query_encoder.training and not student.doc_encoder.training
    doc_before = {k: v.clone() for k, v in student.doc_encoder.state_dict().items()}
    proj_before = {k: v.clone() for k, v in student.doc_projection.state_dict().items()}
    query_before = student.query_encoder.embeddings.word_embeddings.weight.clone()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter, as a trainer
    inputs = student.prepare(QUERIES, DOCS, [[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(student(inputs) / 0.05, torch.zeros(3, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, doc_before[k]) for k, v in student.doc_encoder.state_dict().items())
    assert all(torch.equal(v, proj_before[k]) for k, v in student.doc_projection.state_dict().items())
    assert not torch.equal(student.query_encoder.embeddings.word_embeddings.weight, query_before)


# ------------------------------------------------------------------------------ B. TCT-ColBERT's student tokens
def _tct_settings() -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONF / "student" / "tct_mean.yaml"))
    return {k: v for k, v in node.items() if k not in ("_target_", "model_name_or_path")}


def test_tct_mean_lays_out_tokens_as_the_original(folders):
    student = DualEncoder(folders["bert"], **_tct_settings()).eval()
    docs = student.doc_formatter(DOCS)
    # tokenization.py convert_to_colbert_input: tokens of "[D] " + d cut to max_seq_length - 1, "[CLS]" in front,
    # no "[SEP]" (the line that adds it is commented out)
    short = _ids(["[CLS]", "[", "d", "]", "dna", "is", "a", "molecule"])
    assert docs["input_ids"][0].tolist() == short + [0] * (docs["input_ids"].shape[1] - len(short))
    assert docs["attention_mask"][0].tolist() == [1] * len(short) + [0] * (docs["input_ids"].shape[1] - len(short))
    long = _ids(["[CLS]", "[", "d", "]", *DOCS[2].split()])[:154]
    assert docs["input_ids"][2].tolist() == long and VOCAB["[SEP]"] not in docs["input_ids"].tolist()[2]
    # queries: "[Q] " + q, cut to 35, "[CLS]" in front, "[MASK]" to 36, all attended
    queries = student.query_formatter(QUERIES)
    for row, q in zip(queries["input_ids"].tolist(), QUERIES):
        expected = _ids(["[CLS]", "[", "q", "]", *q.split()])[:36]
        assert row == expected + [VOCAB["[MASK]"]] * (36 - len(expected))
    assert bool(queries["attention_mask"].all()) and queries["input_ids"].shape == (3, 36)


def test_tct_mean_pools_positions_4_on_as_the_original(folders):
    student = DualEncoder(folders["bert"], **_tct_settings()).eval()
    docs, queries = _encode(student, DOCS, "doc"), _encode(student, QUERIES, "query")  # one padded batch each
    for row, d in zip(docs, DOCS):
        _close(row, _mean_from_4(folders["bert"], _ids(["[CLS]", "[", "d", "]", *d.split()])[:154]), atol=1e-5)
    for row, q in zip(queries, QUERIES):
        ids = _ids(["[CLS]", "[", "q", "]", *q.split()])[:36]
        _close(row, _mean_from_4(folders["bert"], ids + [VOCAB["[MASK]"]] * (36 - len(ids))), atol=1e-5)


# ------------------------------------------------------------------------------------- C. released checkpoints
@torch.no_grad()
def _pyserini(folder: Path, text: str, side: str, doc_length: int = 154) -> torch.Tensor:
    """pyserini/encode/_tct_colbert.py as written: the literal "[CLS] [Q] " / "[CLS] [D] " strings tokenised with
    add_special_tokens=False (queries: + "[MASK]" * 36, cut to 36), BertModel, mean over 4.. (documents: masked)."""
    tok, bert = (
        AutoTokenizer.from_pretrained(folder),
        BertModel.from_pretrained(folder, add_pooling_layer=False).eval(),
    )
    if side == "query":
        inputs = tok("[CLS] [Q] " + text + "[MASK]" * 36, max_length=36, truncation=True, add_special_tokens=False,
                     return_tensors="pt")  # fmt: skip
        return bert(**inputs).last_hidden_state[0, 4:].mean(0)
    inputs = tok(["[CLS] [D] " + text], max_length=doc_length, padding="longest", truncation=True,
                 add_special_tokens=False, return_tensors="pt")  # fmt: skip
    hidden, mask = bert(**inputs).last_hidden_state[:, 4:], inputs["attention_mask"][:, 4:, None].float()
    return ((hidden * mask).sum(1) / mask.sum(1))[0]


def test_tct_colbert_release_reads_as_the_tct_student_and_as_a_teacher(folders, tmp_path):
    hub = folders["tct_hub"]
    keys = list(load_file(hub / "model.safetensors"))
    assert all(k.startswith(("bert.", "cls.")) for k in keys) and any(k.startswith("cls.") for k in keys)
    cfg = compose_cfg(tmp_path, ["student=tct_mean", f"student.model_name_or_path={hub}"])
    student = instantiate(cfg.student).eval()
    for row, q in zip(_encode(student, QUERIES, "query"), QUERIES):
        _close(row, _pyserini(hub, q, "query"), atol=1e-5)
    for row, d in zip(_encode(student, DOCS, "doc"), DOCS):
        _close(row, _pyserini(hub, d, "doc"), atol=1e-5)

    # a kdir folder of it (what a converter writes) carries the conventions: a teacher with no further setting
    converted = student.save_pretrained(tmp_path / "tct_kdir")
    cfg = compose_cfg(tmp_path, ["teacher=bi_encoder", f"teacher.path={converted}"])
    teacher = instantiate(cfg.teacher).freeze()
    assert teacher.config == student.config
    scores = teacher.score(QUERIES[:2], DOCS, [[0, 1, 2], [2, 1, 0]])
    q = torch.stack([_pyserini(hub, x, "query") for x in QUERIES[:2]])
    d = torch.stack([_pyserini(hub, x, "doc") for x in DOCS])
    _close(scores, (q @ d.T).gather(1, torch.tensor([[0, 1, 2], [2, 1, 0]])), atol=1e-4)


@torch.no_grad()
def _bert_dot(folder: Path, text: str, max_length: int) -> torch.Tensor:
    """BERT_Dot (matchmaker models/bert_dot.py forward_representation; the neural-ranking-kd usage example): the
    tokenizer's [CLS] ... [SEP] cut to max_length, the plain DistilBertModel, the [CLS] vector, no projection."""
    tok = AutoTokenizer.from_pretrained(folder)
    inputs = tok(text, max_length=max_length, truncation=True, return_tensors="pt")
    return AutoModel.from_pretrained(folder).eval()(**inputs)[0][0, 0]


def test_bert_dot_release_reads_as_the_bert_dot_student_and_as_a_teacher(folders, tmp_path):
    hub = folders["bert_dot_hub"]
    state = torch.load(hub / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(DistilBertModel(DistilBertModel.config_class.from_pretrained(hub)).state_dict())
    assert json.loads((hub / "config.json").read_text())["architectures"] == ["DistilBertModel"]  # no projection
    student = instantiate(compose_cfg(tmp_path, ["student=bert_dot", f"student.model_name_or_path={hub}"]).student)
    assert student.dim == 32 and student.query_projection is None
    texts = QUERIES + DOCS
    for row, t in zip(_encode(student.eval(), texts, "query"), texts):
        _close(row, _bert_dot(hub, t, 30), atol=1e-5)
    for row, t in zip(_encode(student, texts, "doc"), texts):
        _close(row, _bert_dot(hub, t, 200), atol=1e-5)

    overrides = ["teacher.pooling=cls", "teacher.query_max_length=30", "teacher.doc_max_length=200"]
    teacher = instantiate(compose_cfg(tmp_path, ["teacher=bi_encoder", f"teacher.path={hub}", *overrides]).teacher)
    scores = teacher.freeze().score(QUERIES[:2], DOCS, [[0, 1, 2], [1, 2, 0]])
    q = torch.stack([_bert_dot(hub, x, 30) for x in QUERIES[:2]])
    d = torch.stack([_bert_dot(hub, x, 200) for x in DOCS])
    _close(scores, (q @ d.T).gather(1, torch.tensor([[0, 1, 2], [1, 2, 0]])), atol=1e-4)
