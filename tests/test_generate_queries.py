"""EmbedDistill query generation (Kim et al. 2023, §3.5): the stage on a tiny random BART, dedupe, the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from kdir.data.dataset import IRDataset
from kdir.data.generated import GeneratedQueries, write_generated
from kdir.data.generation import dedupe, mask_span, pick_sources
from kdir.errors import DataFormatError, KdirError

SMALL = ("batch_size=4", "generator.max_source_length=32", "generator.generation.max_new_tokens=8")


@pytest.fixture(scope="module")
def tiny_bart(quickstart, tmp_path_factory):
    """A randomly initialised 1+1-layer BART over the quickstart WordPiece vocabulary, saved with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(quickstart["model"]))
    ids = tok.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    pad, bos, eos, mask = ids
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        decoder_start_token_id=bos,
        forced_eos_token_id=eos,
        mask_token_id=mask,
    )
    path = tmp_path_factory.mktemp("generator") / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train(quickstart) -> IRDataset:
    return IRDataset.from_beir(quickstart["data"], split="train", name="quickstart")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One intra-op thread in the subprocesses: a tiny model gains nothing from more, and a busy CPU costs a lot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _generate(tiny_bart, out, generator: str, *extra: str):
    result = run_cli(
        "kdir.generate_queries",
        f"generator={generator}",
        f"generator.model={tiny_bart}",
        "data=quickstart",
        f"out={out}",
        f"hydra.run.dir={out.parent / (out.name + '.run')}",
        *SMALL,
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return GeneratedQueries.from_tsv(out)


def _check(gq: GeneratedQueries, out, valid_sources: set[str], max_rows: int) -> dict:
    assert 0 < len(gq) <= max_rows
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(gq)
    assert len(set(gq.ids)) == len(gq) and all(i.startswith("gen-") for i in gq.ids)
    assert all(t.strip() for t in gq.texts)
    assert all(s in valid_sources for s in gq.sources)
    meta = json.loads((out.parent / f"{out.name}.meta.json").read_text())
    assert meta["counts"]["written"] == len(gq)
    assert meta["counts"]["generated"] == max_rows
    assert meta["counts"]["generated"] - sum(meta["counts"]["dropped"].values()) == len(gq)
    return meta


def test_docs_mode(tiny_bart, train, tmp_path):
    out = tmp_path / "d2q.tsv"
    gq = _generate(tiny_bart, out, "doc2query_t5", "n_sources=6", "generator.per_source=2")
    meta = _check(gq, out, set(train.corpus.ids), max_rows=12)
    assert meta["source"] == "docs" and meta["counts"]["sources"] == 6
    assert len(set(gq.sources)) <= 6


def test_queries_mode_is_deterministic(tiny_bart, train, tmp_path):
    outs = [tmp_path / f"infill{i}.tsv" for i in range(2)]
    runs = [_generate(tiny_bart, out, "bart_infill", "n_sources=5", "generator.per_source=2") for out in outs]
    meta = _check(runs[0], outs[0], set(train.queries.ids), max_rows=10)
    assert meta["source"] == "queries"
    assert outs[0].read_bytes() == outs[1].read_bytes()
    real = {" ".join(t.lower().split()) for t in train.queries.texts}
    assert not real & {" ".join(t.lower().split()) for t in runs[0].texts}


def test_dedupe_drops_copies_of_real_queries_and_repeats():
    real = ["what is bm25", "dense retrieval"]
    texts = [
        "What is  BM25",
        "sparse retrieval",
        "sparse  retrieval",
        "new query",
        "dense retrieval",
        "SPARSE retrieval",
    ]
    kept, dropped = dedupe(texts, real)
    assert kept == [1, 3]
    assert dropped == {"copies_of_real": 2, "duplicates": 2}
    assert dedupe([], real) == ([], {"copies_of_real": 0, "duplicates": 0})


def test_mask_span_keeps_a_word():
    rng = np.random.default_rng(0)
    for text in ["a b c d e", "a b", "one"]:
        for _ in range(20):
            words, masked = text.split(), mask_span(text, "[MASK]", rng, max_span=3).split()
            k, tail = masked.index("[MASK]"), len(masked) - masked.index("[MASK]") - 1
            assert masked.count("[MASK]") == 1 and masked[:k] == words[:k]  # one contiguous span replaced
            assert masked[k + 1 :] == words[len(words) - tail :]
            assert 1 <= len(words) - (len(masked) - 1) <= (min(3, len(words) - 1) if len(words) > 1 else 1)


def test_pick_sources(train):
    ids, texts = pick_sources(train, "queries", 7, seed=1)
    assert len(ids) == 7 and ids == pick_sources(train, "queries", 7, seed=1)[0]
    assert all(train.queries.texts[train.queries.index[i]] == t for i, t in zip(ids, texts))
    assert len(pick_sources(train, "docs", None, seed=1)[0]) == len(train.corpus)
    with pytest.raises(KdirError, match="generator.source"):
        pick_sources(train, "passages", 3, seed=1)


def test_bad_source_exits_2(tiny_bart, tmp_path):
    out = tmp_path / "bad.tsv"
    result = run_cli(
        "kdir.generate_queries",
        "generator=bart_infill",
        "generator.source=passages",
        f"generator.model={tiny_bart}",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2 and "generator.source" in result.stdout + result.stderr
    assert not out.exists()


def test_write_and_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "gen.tsv"
    write_generated(path, ["gen-0", "gen-1"], ["first query", "zweite anfrage é"], ["d1", None])
    gq = GeneratedQueries.from_tsv(path)
    assert (gq.ids, gq.texts, gq.sources) == (["gen-0", "gen-1"], ["first query", "zweite anfrage é"], ["d1", None])
    assert gq.to_text_store().index == {"gen-0": 0, "gen-1": 1}
    assert [p.name for p in path.parent.iterdir()] == ["gen.tsv"]  # no temporary file left behind
    for ids, texts in ((["a", "a"], ["x", "y"]), (["a"], [""]), (["a"], ["x\ty"]), (["a", "b"], ["x"])):
        with pytest.raises(KdirError):
            write_generated(path, ids, texts)


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [
        ("g1\tfirst\td1\ng2\tsecond\td2\textra\n", 2, "columns"),
        ("g1\n", 1, "columns"),
        ("g1\tfirst\n\ng2\t  \td2\n", 3, "non-empty query text"),
        ("g1\tfirst\td1\ng2\tsecond\ng1\tthird\td3\n", 3, "unique query id"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, content, line, expected):
    path = tmp_path / "gen.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=expected) as err:
        GeneratedQueries.from_tsv(path)
    assert f"{path}:{line}:" in str(err.value) and err.value.line == line
