"""Model-free query generators (``generator=title|sentence|crop``) on a hand-made three-document BEIR folder: the
texts they give, their seeding, the de-duplication, the command end to end, and the corpus-without-titles error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import ROOT, compose_cfg, run_cli, run_command

from kdir.data.dataset import IRDataset, load_texts
from kdir.data.generated import GeneratedQueries
from kdir.data.generation import SentenceQueries, SpanCropQueries, TitleQueries, split_sentences
from kdir.errors import ConfigError

TITLES = {"d1": "Dense retrieval basics", "d2": "Sparse retrieval", "d3": ""}
BODIES = {
    "d1": "Dense retrievers encode queries and documents. They compare vectors by inner product!  Is this fast? "
    "We use tools, e.g. the FAISS library, for search. 3 indexes were built in 2021.",
    "d2": "BM25 weighs terms by their frequency. Inverted indexes store one postings list per term.",
    "d3": "a document without a title but with enough words to crop from",
}
# d1 and d2 split by hand: after . ! ? followed by whitespace and a capital or a digit ("e.g. the" does not end one)
SENTENCES = {
    "d1": [
        "Dense retrievers encode queries and documents.",
        "They compare vectors by inner product!",
        "Is this fast?",  # 3 words: below min_words=4, never drawn
        "We use tools, e.g. the FAISS library, for search.",
        "3 indexes were built in 2021.",
    ],
    "d2": ["BM25 weighs terms by their frequency.", "Inverted indexes store one postings list per term."],
    "d3": ["a document without a title but with enough words to crop from"],
}
README = ROOT / "README.md"
QUERIES = {"q1": "what is dense retrieval", "q2": "  sparse   RETRIEVAL "}  # q2 is d2's title, case and spaces aside


def _beir(root, titles: bool = True):
    (root / "qrels").mkdir(parents=True)
    rows = [{"_id": d, "text": BODIES[d]} | ({"title": TITLES[d]} if titles else {}) for d in BODIES]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return root


@pytest.fixture
def beir(tmp_path):
    return _beir(tmp_path / "beir")


@pytest.fixture
def train(beir) -> IRDataset:
    return IRDataset.from_beir(beir, "train")


def _generate(tmp_path, root, *overrides: str) -> dict:
    """Run the command in this process on the BEIR folder ``root``; returns ``<out>.meta.json``."""
    out, run = tmp_path / "out" / "gen.tsv", tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    data = ("data=quickstart", f"datasets.quickstart.root={root}")
    assert run_command("kdir.generate_queries", *data, f"out={out}", f"hydra.run.dir={run}", *overrides) == 0
    return json.loads((tmp_path / "out" / "gen.tsv.meta.json").read_text())


def _words_at(words: list[str], span: list[str]) -> bool:
    return any(words[i : i + len(span)] == span for i in range(len(words) - len(span) + 1))


# ---------------------------------------------------------------- titles kept by the reader


def test_the_beir_reader_keeps_titles_and_the_merged_text(beir, train, tmp_path):
    corpus = train.corpus
    assert corpus.ids == ["d1", "d2", "d3"]
    assert corpus.titles == ["Dense retrieval basics", "Sparse retrieval", ""]
    assert corpus.texts[0] == f"{TITLES['d1']} {BODIES['d1']}" and corpus.texts[2] == BODIES["d3"]
    assert train.queries.titles is None  # no query has a title
    assert IRDataset.from_beir(_beir(tmp_path / "untitled", titles=False), "train").corpus.titles is None
    (tmp_path / "corpus.tsv").write_text("d1\tsome text\n")
    assert load_texts(str(tmp_path / "corpus.tsv")).titles is None


# ---------------------------------------------------------------- each generator


def test_title_is_the_documents_title_and_an_empty_title_gives_none(train):
    out = TitleQueries().generate(train.corpus.texts, train.corpus.titles, np.random.default_rng(0))
    assert out == [["Dense retrieval basics"], ["Sparse retrieval"], []]


def test_the_sentence_splitter_matches_the_hand_split():
    for doc, sentences in SENTENCES.items():
        assert split_sentences(BODIES[doc]) == sentences, doc


def test_sentences_are_distinct_hand_split_sentences_of_their_document(train):
    gen = SentenceQueries(per_source=3, min_words=4)
    for seed in range(10):
        out = gen.generate(train.corpus.texts, train.corpus.titles, np.random.default_rng(seed))
        for doc, drawn in zip(train.corpus.ids, out):
            eligible = [s for s in SENTENCES[doc] if len(s.split()) >= 4]
            assert len(drawn) == min(3, len(eligible)) and len(set(drawn)) == len(drawn)
            assert set(drawn) <= set(eligible), (doc, drawn)  # never the title, never "Is this fast?"
    short = SentenceQueries(per_source=1, min_words=20)
    assert short.generate(["Too short to be drawn."], None, np.random.default_rng(0)) == [[]]


def test_crops_are_contiguous_spans_of_the_right_lengths(train):
    gen = SpanCropQueries(per_source=30, min_words=3, max_words=6)
    out = gen.generate(train.corpus.texts, train.corpus.titles, np.random.default_rng(0))
    lengths = set()
    for doc, crops in zip(train.corpus.ids, out):
        words = BODIES[doc].split()  # the document's own words, its title left out
        assert len(crops) == 30
        for crop in crops:
            span = crop.split()
            assert 3 <= len(span) <= 6 and _words_at(words, span), (doc, crop)
            lengths.add(len(span))
    assert lengths == {3, 4, 5, 6}
    short = SpanCropQueries(per_source=2, min_words=4, max_words=6)
    out = short.generate(["three short words", "four words right here"], None, np.random.default_rng(0))
    assert out == [[], ["four words right here"] * 2]  # too short: none; the length is clipped to the document
    with pytest.raises(ConfigError, match="min_words <= max_words"):
        SpanCropQueries(min_words=5, max_words=4)


@pytest.mark.parametrize("gen", [SentenceQueries(per_source=2), SpanCropQueries(per_source=3)], ids=["sent", "crop"])
def test_same_seed_same_queries_other_seed_others(train, gen):
    def run(seed: int) -> list[list[str]]:
        return gen.generate(train.corpus.texts, train.corpus.titles, np.random.default_rng(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---------------------------------------------------------------- the command


def test_title_command_dedupes_against_real_queries_and_counts_drops(beir, tmp_path):
    meta = _generate(tmp_path, beir, "generator=title")
    gq = GeneratedQueries.from_tsv(tmp_path / "out" / "gen.tsv")
    assert (gq.texts, gq.sources) == (["Dense retrieval basics"], ["d1"])  # d2's title is the real query q2
    assert meta["generator"] == "title" and meta["source"] == "docs"
    assert meta["counts"] == {
        "sources": 3,
        "generated": 3,
        "dropped": {"empty_title": 1, "copies_of_real": 1, "duplicates": 0},
        "written": 1,
    }
    assert "load" not in meta["seconds"]


def test_n_sources_times_per_source_is_the_output_size_and_a_seed_repeats(beir, tmp_path):
    overrides = ("generator=crop", "n_sources=2", "generator.per_source=4", "generator.max_words=5")
    meta = _generate(tmp_path, beir, *overrides)
    first = (tmp_path / "out" / "gen.tsv").read_bytes()
    assert meta["counts"]["sources"] == 2 and meta["counts"]["generated"] == 8
    assert meta["counts"]["written"] + sum(meta["counts"]["dropped"].values()) == 8
    again = _generate(tmp_path, beir, *overrides)
    assert again["counts"] == meta["counts"] and (tmp_path / "out" / "gen.tsv").read_bytes() == first
    _generate(tmp_path, beir, *overrides, "seed=1")
    assert (tmp_path / "out" / "gen.tsv").read_bytes() != first


def test_crop_end_to_end_loads_no_model(beir, tmp_path):
    out = tmp_path / "crop.tsv"
    result = run_cli(
        "kdir.generate_queries",
        "generator=crop",
        "generator.per_source=2",
        "data=quickstart",
        f"datasets.quickstart.root={beir}",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPROFILEIMPORTTIME": "1"},  # every import on stderr
    )
    assert result.returncode == 0, result.stderr[-3000:]
    gq = GeneratedQueries.from_tsv(out)
    assert 0 < len(gq) <= 6 and set(gq.sources) <= set(BODIES)
    assert all(_words_at(BODIES[s].split(), t.split()) for t, s in zip(gq.texts, gq.sources))
    meta = json.loads((tmp_path / "crop.tsv.meta.json").read_text())
    assert meta["generator"] == "crop" and meta["counts"]["written"] == len(gq)
    imported = re.findall(r"^import time:.*\|\s+(\S+)\s*$", result.stderr, re.M)
    assert "numpy" in imported and not {"transformers", "tokenizers"} & {m.split(".")[0] for m in imported}


def test_a_corpus_without_titles_is_a_clear_error_and_its_hint_works(tmp_path, capsys):
    root = _beir(tmp_path / "untitled", titles=False)
    common = ("data=quickstart", f"datasets.quickstart.root={root}", f"out={tmp_path / 'gen.tsv'}")
    assert run_command("kdir.generate_queries", "generator=title", *common, f"hydra.run.dir={tmp_path / 'a'}") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "has no document titles" in lines[0] and "use generator=sentence" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "gen.tsv").exists()
    assert run_command("kdir.generate_queries", "generator=sentence", *common, f"hydra.run.dir={tmp_path / 'b'}") == 0
    assert len(GeneratedQueries.from_tsv(tmp_path / "gen.tsv")) > 0


def test_the_readme_generator_commands_compose(tmp_path):
    """Every ``python -m kdir.generate_queries generator=...`` line of the README composes as printed."""
    lines = re.findall(r"^python -m kdir\.generate_queries (generator=.*?)(?:\s+#.*)?$", README.read_text(), re.M)
    assert lines
    for line in lines:
        cfg = compose_cfg(tmp_path, line.split(), "generate_queries")
        assert cfg.generator._target_.startswith("kdir.data.generation."), line
