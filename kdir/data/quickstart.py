"""The offline quickstart: a generated retrieval collection and a tiny randomly initialised BERT.

The collection is built so that learning is visible. Each document has a topic and an entity; its
text uses the topic's *document* words. Each query names the entity and describes the topic with
one document word of the topic plus two *query* words, synonyms that never occur in documents. An
untrained encoder cannot tell topics or entities apart; a trained one learns the synonym map.

Teacher signal: a noisy oracle (entity match + topic match + Gaussian noise) scores every candidate
of a lexical (token-overlap) run, standing in for a trained cross-encoder so that the default
``python -m kdir.run`` exercises cached-score distillation end to end.

Everything is written under ``$KDIR_CACHE/quickstart-v1`` (default ``~/.cache/kdir``), atomically.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kdir.errors import ConfigError
from kdir.utils.io import build_folder


@contextmanager
def own_generators(seed: int = 0) -> Iterator[None]:
    """Run a block under its own seeded generators (Python, NumPy, torch CPU), then give the caller's back: what the
    quickstart builds on first use leaves a seeded run drawing exactly as if it had been cached."""
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


VERSION = "quickstart-v3"
N_TOPICS, N_ENTITIES, N_DOCS = 40, 80, 2000
WORDS_PER_TOPIC, N_FILLER = 6, 150
SPLITS = {"train": 1200, "dev": 150, "test": 200}
SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def cache_root() -> Path:
    return Path(os.environ.get("KDIR_CACHE", Path.home() / ".cache" / "kdir"))


def _words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    cons, vow = list("bdfgklmnprstvz"), list("aeiou")
    out = []
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vow) for _ in range(int(rng.integers(2, 4))))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def build_data(out: Path, seed: int = 13) -> list[str]:
    """Write the collection (BEIR layout + run + teacher scores) to ``out``; return the vocabulary."""
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    doc_words = [_words(rng, WORDS_PER_TOPIC, taken) for _ in range(N_TOPICS)]
    query_words = [_words(rng, WORDS_PER_TOPIC, taken) for _ in range(N_TOPICS)]
    entities = _words(rng, N_ENTITIES, taken)
    filler = _words(rng, N_FILLER, taken)

    combos = rng.choice(N_TOPICS * N_ENTITIES, size=N_DOCS, replace=False)
    topic, entity = combos // N_ENTITIES, combos % N_ENTITIES
    docs = []
    for i in range(N_DOCS):
        words = list(rng.choice(doc_words[topic[i]], size=6)) + [entities[entity[i]]] * 2
        words += list(rng.choice(filler, size=int(rng.integers(6, 12))))
        rng.shuffle(words)
        docs.append({"_id": f"d{i}", "title": "", "text": " ".join(words)})
    _write_lines(out / "corpus.jsonl", (json.dumps(d) for d in docs))

    targets = rng.permutation(N_DOCS)[: sum(SPLITS.values())]
    queries, split_of, start = [], {}, 0
    for split, n in SPLITS.items():
        rows = []
        for j, d in enumerate(targets[start : start + n]):
            qid = f"{split[:2]}{j}"
            words = [entities[entity[d]], str(rng.choice(doc_words[topic[d]]))]
            words += list(rng.choice(query_words[topic[d]], size=2, replace=False))
            words += list(rng.choice(filler, size=2))
            rng.shuffle(words)
            queries.append({"_id": qid, "text": " ".join(words)})
            rows.append(f"{qid}\td{d}\t1")
            split_of[qid] = (split, int(d))
        _write_lines(out / "qrels" / f"{split}.tsv", ["query-id\tcorpus-id\tscore", *rows])
        start += n
    _write_lines(out / "queries.jsonl", (json.dumps(q) for q in queries))

    # Lexical run (token overlap) for the training queries: the negatives' candidate pool.
    doc_tokens = [set(d["text"].split()) for d in docs]
    train = [q for q in queries if split_of[q["_id"]][0] == "train"]
    run_lines, score_lines, triple_lines = [], [], []
    q_topic_of = {w: t for t in range(N_TOPICS) for w in query_words[t] + doc_words[t]}
    for q in train:
        qtok = set(q["text"].split())
        overlap = np.array([len(qtok & dt) for dt in doc_tokens], dtype=np.float32)
        top = np.argsort(-overlap - rng.random(N_DOCS) * 1e-3)[:30]
        pos = split_of[q["_id"]][1]
        q_topics = [q_topic_of[w] for w in q["text"].split() if w in q_topic_of]
        q_entity = next(e for e, w in enumerate(entities) if w in qtok)
        for rank, d in enumerate(top, start=1):
            run_lines.append(f"{q['_id']} Q0 d{d} {rank} {overlap[d]:.4f} overlap")

        # noisy oracle teacher: entity match + share of the query's topic words that match the document
        scores = {
            d: float(
                4.0 * (entity[d] == q_entity) + 6.0 * np.mean([t == topic[d] for t in q_topics]) + rng.normal(0, 0.5)
            )
            for d in sorted({int(d) for d in top} | {pos})
        }
        score_lines += [f"{q['_id']}\td{d}\t{s:.4f}" for d, s in scores.items()]
        triple_lines += [f"{scores[pos]:.4f}\t{scores[d]:.4f}\t{q['_id']}\td{pos}\td{d}" for d in top[:3] if d != pos]
    _write_lines(out / "runs" / "train.trec", run_lines)
    _write_lines(out / "teacher" / "scores.tsv", score_lines)
    _write_lines(out / "teacher" / "margin_triples.tsv", triple_lines)
    vocab = [w for ws in doc_words + query_words for w in ws] + entities + filler
    return vocab


def build_model(out: Path, vocab: list[str], seed: int = 0, hidden: int = 64, layers: int = 2) -> None:
    """Write a randomly initialised BERT and its WordPiece tokenizer (HF format) to ``out``."""
    import inspect

    from transformers import BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokens = SPECIAL + sorted(set(vocab))
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    if tok.tokenize(tokens[-1]) != [tokens[-1]]:
        raise RuntimeError("quickstart tokenizer does not know its own vocabulary")
    with own_generators(seed):  # the caller's generators (a seeded training run) are left as they were
        _build_bert(out, len(tok), hidden, layers)
    tok.save_pretrained(out)


def _build_bert(out: Path, vocab_size: int, hidden: int, layers: int) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(out)


def _build(folder: Path) -> None:
    folder.mkdir()
    build_model(folder / "model", build_data(folder / "data"))


def ensure(what: str = "data") -> str:
    """Path of the quickstart ``data`` or ``model`` folder, building both (once, atomically) if missing."""
    root = cache_root() / VERSION
    if not (root / "data").is_dir() or not (root / "model").is_dir():
        build_folder(root, _build)
    if what not in ("data", "model"):
        raise ConfigError(f"quickstart asset must be 'data' or 'model', got {what!r}")
    return str(root / what)


if __name__ == "__main__":
    print(ensure("data"), ensure("model"), sep="\n")
