"""An IR split in memory: corpus, queries and qrels, with string ids mapped to dense int codes.

Everything downstream speaks int codes (row numbers of ``doc_ids`` / ``query_ids``); texts
are looked up once, at collation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdir.data.formats import read_jsonl_texts, read_qrels, read_tsv_texts
from kdir.errors import ConfigError, EmptySplitError, MissingFileError, UnknownIdError, UnknownNameError


@dataclass(frozen=True)
class TextStore:
    """Id → text lookup with dense int codes (row ``i`` has id ``ids[i]``).

    ``titles`` (documents only): row ``i``'s title (``""`` if it has none; ``texts[i]`` already starts with it),
    or ``None`` when the source has no non-empty title (TSV files, BEIR corpora without titles).
    """

    ids: list[str]
    texts: list[str]
    index: dict[str, int] = field(repr=False)
    titles: list[str] | None = field(default=None, repr=False)

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[tuple[str, str]], source: str = "<memory>", titles: list[str] | None = None
    ) -> TextStore:
        ids, texts = [], []
        for _id, text in pairs:
            ids.append(_id)
            texts.append(text)
        if not ids:
            raise EmptySplitError(f"{source}: no texts")
        index = {_id: i for i, _id in enumerate(ids)}
        if len(index) != len(ids):
            raise UnknownIdError(f"{source}: duplicate ids ({len(ids) - len(index)} of them)")
        if titles is not None and len(titles) != len(ids):
            raise ValueError(f"{source}: {len(titles)} titles for {len(ids)} texts")
        return cls(ids, texts, index, titles if titles and any(titles) else None)

    def __len__(self) -> int:
        return len(self.ids)

    def codes(self, ids: Iterable[str], source: str = "<input>") -> np.ndarray:
        """Map string ids to int codes, failing on the first id not in the store."""
        out = []
        for _id in ids:
            code = self.index.get(_id)
            if code is None:
                raise UnknownIdError(f"{source}: id {_id!r} is not in the store ({len(self)} ids)")
            out.append(code)
        return np.asarray(out, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def load_texts(path: str, allow_empty: bool = True) -> TextStore:
    """Load (once per process) a text file: ``.jsonl`` (BEIR) or ``.tsv`` (``id<TAB>text``).

    ``allow_empty``: documents may have an empty text (one warning gives their count); queries may not
    (``False``: an error naming the file and line). A BEIR file's titles are kept too (:attr:`TextStore.titles`).
    """
    if not path.endswith((".jsonl", ".json")):
        return TextStore.from_pairs(read_tsv_texts(path, allow_empty=allow_empty), source=path)
    titles: list[str] = []

    def pairs() -> Iterator[tuple[str, str]]:
        for _id, text, title in read_jsonl_texts(path, allow_empty=allow_empty, with_title=True):
            titles.append(title)
            yield _id, text

    return TextStore.from_pairs(pairs(), source=path, titles=titles)  # from_pairs reads pairs() to the end first


@dataclass
class IRDataset:
    """One split of a retrieval collection.

    Attributes:
        corpus: every document of the collection.
        queries: the queries of this split (those with qrels, unless ``keep_all_queries``).
        qrels: ``{qid: {pid: relevance}}`` of this split, every grade kept (metrics need them).
        min_relevance: the grade from which a judged document counts as a training positive.
        name: a short label for logs.
    """

    corpus: TextStore
    queries: TextStore
    qrels: dict[str, dict[str, int]]
    min_relevance: int = 1
    name: str = "dataset"

    def positives(self) -> dict[str, list[str]]:
        """``{qid: [pid, ...]}`` of the documents judged ``>= min_relevance``, in qrels order."""
        out = {q: [d for d, r in docs.items() if r >= self.min_relevance] for q, docs in self.qrels.items()}
        return {q: ds for q, ds in out.items() if ds}

    def __post_init__(self) -> None:
        for qid, docs in self.qrels.items():
            if qid not in self.queries.index:
                raise UnknownIdError(f"{self.name}: qrels query {qid!r} is not among the queries")
            for pid in docs:
                if pid not in self.corpus.index:
                    raise UnknownIdError(f"{self.name}: qrels document {pid!r} (query {qid!r}) is not in the corpus")

    @staticmethod
    def _restrict(queries: TextStore, qrels: dict[str, dict[str, int]], name: str) -> TextStore:
        missing = [q for q in qrels if q not in queries.index]
        if missing:
            raise UnknownIdError(
                f"{name}: {len(missing)} qrels queries are not among the queries, e.g. {missing[0]!r}"
            )
        keep = [q for q in queries.ids if q in qrels]
        if not keep:
            raise EmptySplitError(f"{name}: no query of the split has qrels")
        return TextStore.from_pairs(((q, queries.texts[queries.index[q]]) for q in keep), source=name)

    @classmethod
    def from_beir(
        cls, root: str | Path, split: str = "test", min_relevance: int = 1, name: str | None = None
    ) -> IRDataset:
        """Load a BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``; ``name`` labels logs."""
        root = Path(root)
        if not root.is_dir():
            raise MissingFileError(f"{root}: no such dataset folder (expected corpus.jsonl, queries.jsonl, qrels/)")
        qrels_path = root / "qrels" / f"{split}.tsv"
        if not qrels_path.is_file():
            have = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
            raise MissingFileError(f"{qrels_path}: no such split; available splits: {have}")
        qrels = read_qrels(qrels_path)
        _check_positives(qrels, min_relevance, qrels_path)
        corpus = load_texts(str(root / "corpus.jsonl"))
        queries = cls._restrict(load_texts(str(root / "queries.jsonl"), allow_empty=False), qrels, str(qrels_path))
        return cls(corpus, queries, qrels, min_relevance, name=f"{name or root.name}/{split}")

    @classmethod
    def from_msmarco(
        cls, collection: str | Path, queries: str | Path, qrels: str | Path, min_relevance: int = 1
    ) -> IRDataset:
        """Load MS MARCO style TSV files: ``collection.tsv``, ``queries.*.tsv`` and a TREC/BEIR qrels file."""
        q = read_qrels(qrels)
        _check_positives(q, min_relevance, qrels)
        restricted = cls._restrict(load_texts(str(queries), allow_empty=False), q, str(qrels))
        return cls(load_texts(str(collection)), restricted, q, min_relevance, name=Path(queries).stem)

    @classmethod
    def from_ir_datasets(cls, dataset_id: str, min_relevance: int = 1) -> IRDataset:
        """Load any `ir_datasets <https://ir-datasets.com>`_ id with docs, queries and qrels.

        E.g. ``beir/scifact/test`` or ``msmarco-passage/trec-dl-2019/judged``. Document text is
        ``title + " " + text`` where the dataset has titles.
        """
        import ir_datasets

        try:
            ds = ir_datasets.load(dataset_id)
        except KeyError:
            raise UnknownNameError(f"unknown ir_datasets id {dataset_id!r}") from None
        for need in ("docs", "queries", "qrels"):
            if not getattr(ds, f"has_{need}")():
                raise EmptySplitError(f"ir_datasets {dataset_id!r} has no {need}")
        qrels: dict[str, dict[str, int]] = {}
        for r in ds.qrels_iter():
            qrels.setdefault(r.query_id, {})[r.doc_id] = r.relevance
        _check_positives(qrels, min_relevance, dataset_id)
        corpus = _ir_datasets_docs(ds.docs_cls(), ds.docs_iter(), dataset_id)
        queries = TextStore.from_pairs(((q.query_id, q.text) for q in ds.queries_iter()), source=dataset_id)
        return cls(corpus, cls._restrict(queries, qrels, dataset_id), qrels, min_relevance, name=dataset_id)


def _ir_datasets_docs(docs_cls, docs, source: str) -> TextStore:
    fields = docs_cls._fields
    has_title = "title" in fields
    text_field = "text" if "text" in fields else fields[1]

    titles: list[str] = []

    def pairs():
        for d in docs:
            text = getattr(d, text_field)
            title = d.title if has_title else ""
            titles.append(title or "")
            yield d.doc_id, f"{title} {text}" if title else text

    return TextStore.from_pairs(pairs(), source=source, titles=titles)  # from_pairs reads pairs() to the end first


def _check_positives(qrels: dict[str, dict[str, int]], min_relevance: int, source) -> None:
    if not any(r >= min_relevance for docs in qrels.values() for r in docs.values()):
        raise EmptySplitError(f"{source}: no qrels with relevance >= {min_relevance}")


def holdout(dataset: IRDataset, size: int | float, part: str = "rest", seed: int = 0) -> IRDataset:
    """Carve a held-out set of queries (e.g. a dev split from train) reproducibly.

    Args:
        dataset: the split to carve from.
        size: number of held-out queries, or a fraction if ``< 1``.
        part: ``held`` (the held-out queries) or ``rest`` (the others).
        seed: the carve depends only on the seed and the query ids.
    """
    if part not in ("held", "rest"):
        raise ConfigError(f"holdout part must be 'held' or 'rest', got {part!r}")
    ids = sorted(dataset.qrels)
    n = int(round(size * len(ids))) if size < 1 else int(size)
    if not 0 < n < len(ids):
        raise EmptySplitError(f"{dataset.name}: cannot hold out {size} of {len(ids)} queries")
    held = set(np.random.default_rng(seed).permutation(ids)[:n].tolist())
    keep = {q: d for q, d in dataset.qrels.items() if (q in held) == (part == "held")}
    queries = IRDataset._restrict(dataset.queries, keep, dataset.name)
    return IRDataset(dataset.corpus, queries, keep, dataset.min_relevance, name=f"{dataset.name}[{part}]")
