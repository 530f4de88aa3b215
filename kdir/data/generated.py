"""Generated (synthetic) queries: EmbedDistill's query-generation output (Kim et al. 2023, arXiv 2301.12005, §3.5).

File format: UTF-8 (a byte-order mark is dropped), no header, one query a line, tab separated::

    gid <TAB> text [<TAB> source_id]

``source_id`` names what the query was generated from: a document id (doc2query-style generation from
passages) or a real training query id (masked-span infilling); it is optional and informative only.

These queries are **unlabelled**. They never get hard labels (no qrels, no positives, no one-hot loss):
they enter training only through embedding matching (``L_emb,Q``) and, optionally, score distillation
against the teacher's scores over in-batch documents. ``python -m kdir.generate_queries`` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdir.data.dataset import TextStore
from kdir.data.formats import text_lines
from kdir.errors import DataFormatError, EmptySplitError, KdirError
from kdir.utils.io import atomic_write

EXPECTED = "'gid<TAB>text' or 'gid<TAB>text<TAB>source_id'"


@dataclass
class GeneratedQueries:
    """Unlabelled synthetic queries: row ``i`` is query ``ids[i]`` with ``texts[i]``, made from ``sources[i]``."""

    ids: list[str]
    texts: list[str]
    sources: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_tsv(cls, path: str | Path) -> GeneratedQueries:
        """Read a generated-queries file; a malformed line raises :class:`DataFormatError` naming ``file:line``."""
        path = Path(path)
        ids: list[str] = []
        texts: list[str] = []
        sources: list[str | None] = []
        seen: dict[str, int] = {}
        for lineno, line in text_lines(path):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) not in (2, 3):
                raise DataFormatError(path, lineno, f"{EXPECTED} ({len(fields)} columns)", got=line)
            gid, text = fields[0].strip(), fields[1].strip()
            if not gid:
                raise DataFormatError(path, lineno, "a non-empty query id in column 1", got=line)
            if not text:
                raise DataFormatError(path, lineno, "a non-empty query text in column 2", got=line)
            if gid in seen:
                raise DataFormatError(
                    path, lineno, f"a unique query id ({gid!r} is also on line {seen[gid]})", got=line
                )
            seen[gid] = lineno
            source = fields[2].strip() if len(fields) == 3 else ""
            ids.append(gid)
            texts.append(text)
            sources.append(source or None)
        if not ids:
            raise EmptySplitError(f"{path}: no generated queries")
        return cls(ids, texts, sources)

    def write(self, path: str | Path) -> Path:
        """Write to ``path`` atomically (see :func:`write_generated`)."""
        return write_generated(path, self.ids, self.texts, self.sources)

    def to_text_store(self) -> TextStore:
        """The queries as a :class:`~kdir.data.dataset.TextStore` (id → text, dense int codes)."""
        return TextStore.from_pairs(zip(self.ids, self.texts), source="generated queries")


def write_generated(
    path: str | Path, ids: Sequence[str], texts: Sequence[str], sources: Sequence[str | None] | None = None
) -> Path:
    """Write ``gid<TAB>text[<TAB>source_id]`` lines to ``path`` atomically (:func:`kdir.utils.io.atomic_write`).

    ``sources`` may be ``None`` (no source column) or hold ``None`` for rows without a source.
    Raises :class:`KdirError` on unequal lengths, duplicate or empty ids, empty texts, or fields
    holding tabs / line breaks (they would not read back).
    """
    sources = [None] * len(ids) if sources is None else list(sources)
    if not len(ids) == len(texts) == len(sources):
        raise KdirError(f"write_generated: {len(ids)} ids, {len(texts)} texts and {len(sources)} sources")
    if len(set(ids)) != len(ids):
        raise KdirError(f"write_generated: {len(ids) - len(set(ids))} duplicate ids")
    lines = []
    for gid, text, source in zip(ids, texts, sources):
        fields = [gid, text] + ([] if source is None else [source])
        if not gid.strip() or not text.strip() or any("\t" in x or "\n" in x or "\r" in x for x in fields):
            raise KdirError(f"write_generated: cannot write row {fields!r} (empty id/text, or a tab or line break)")
        lines.append("\t".join(fields) + "\n")
    path = Path(path)
    with atomic_write(path) as f:
        f.writelines(lines)
    return path
