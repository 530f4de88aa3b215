"""Line readers for the IR file formats kdir speaks.

Every reader streams its file and raises :class:`~kdir.errors.DataFormatError` naming the
file and the 1-based line number of the first malformed line. Formats:

=====================  ===============================================  =========================
reader                 line format                                      used by
=====================  ===============================================  =========================
``read_jsonl_texts``   ``{"_id": str, "title"?: str, "text": str}``     BEIR corpus / queries
``read_tsv_texts``     ``id \\t text``                                   MS MARCO collection/queries
``read_qrels``         ``qid \\t pid \\t rel`` (BEIR, optional header)    qrels
                       or ``qid 0 pid rel`` (TREC)
``read_trec_run``      ``qid Q0 pid rank score tag``                    TREC run files
``read_id_triples``    ``qid \\t pos_pid \\t neg_pid``                     MS MARCO id triples
``read_pair_scores``   ``qid \\t pid \\t score``                          teacher score files
``read_margin_scores`` ``pos_score neg_score qid pos_pid neg_pid``      Hofstätter et al. TSV
=====================  ===============================================  =========================
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from kdir.errors import DataFormatError, EmptySplitError, MissingFileError


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    return path.open(encoding="utf-8")


def _rows(
    path: str | Path, n_cols: tuple[int, ...], expected: str, sep: str | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for every non-blank line, checking the column count."""
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep) if sep else line.split()
            if len(fields) not in n_cols:
                raise DataFormatError(path, lineno, expected, got=line)
            yield lineno, fields


def _number(path: str | Path, lineno: int, value: str, what: str, cast=float):
    try:
        return cast(value)
    except ValueError:
        raise DataFormatError(path, lineno, f"{what} to be a number", got=value) from None


def read_jsonl_texts(path: str | Path, title_sep: str = " ") -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` from a BEIR ``corpus.jsonl`` / ``queries.jsonl``.

    A non-empty ``title`` is prepended to ``text`` with ``title_sep`` (the BEIR convention).
    """
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                _id, text = str(obj["_id"]), obj.get("text", "")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataFormatError(path, lineno, 'a JSON object with "_id" and "text"', got=line.strip()) from None
            title = obj.get("title") or ""
            yield _id, f"{title}{title_sep}{text}" if title else text


def read_tsv_texts(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` from an MS MARCO style ``id \\t text`` file."""
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            _id, sep, text = line.partition("\t")
            if not sep or not _id:
                raise DataFormatError(path, lineno, "'id<TAB>text'", got=line)
            yield _id, text


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read qrels as ``{qid: {pid: relevance}}``.

    Accepts BEIR (``query-id corpus-id score``, header line optional) and TREC
    (``qid iteration pid relevance``) layouts, tab or space separated.
    """
    qrels: dict[str, dict[str, int]] = {}
    expected = "'qid pid rel' (BEIR) or 'qid 0 pid rel' (TREC)"
    for lineno, fields in _rows(path, (3, 4), expected):
        if lineno == 1 and fields[-1].lower() in ("score", "rel", "relevance", "label"):
            continue  # BEIR header line: query-id corpus-id score
        qid, pid = fields[0], fields[-2]
        rel = _number(path, lineno, fields[-1], "relevance", int)
        qrels.setdefault(qid, {})[pid] = rel
    if not qrels:
        raise EmptySplitError(f"{path}: no qrels")
    return qrels


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a TREC run file ``qid Q0 pid rank score tag`` as ``{qid: {pid: score}}``."""
    run: dict[str, dict[str, float]] = {}
    for lineno, fields in _rows(path, (6,), "'qid Q0 pid rank score tag'"):
        run.setdefault(fields[0], {})[fields[2]] = _number(path, lineno, fields[4], "score")
    if not run:
        raise EmptySplitError(f"{path}: empty run file")
    return run


def top_ranked(candidates: dict[str, float], depth: int) -> list[str]:
    """The ``depth`` best-scored document ids of one query's run entry, best first."""
    return sorted(candidates, key=candidates.__getitem__, reverse=True)[:depth]


def read_id_triples(path: str | Path) -> Iterator[tuple[int, str, str, str]]:
    """Yield ``(line, qid, pos_pid, neg_pid)`` from an MS MARCO id triples file."""
    for lineno, (qid, pos, neg) in _rows(path, (3,), "'qid<TAB>pos_pid<TAB>neg_pid'"):
        yield lineno, qid, pos, neg


def read_pair_scores(path: str | Path) -> Iterator[tuple[int, str, str, float]]:
    """Yield ``(line, qid, pid, score)`` from a ``qid pid score`` teacher-score file."""
    for lineno, (qid, pid, score) in _rows(path, (3,), "'qid<TAB>pid<TAB>score'"):
        yield lineno, qid, pid, _number(path, lineno, score, "score")


def read_margin_scores(path: str | Path) -> Iterator[tuple[int, float, float, str, str, str]]:
    """Yield ``(line, pos_score, neg_score, qid, pos_pid, neg_pid)`` from Hofstätter et al.'s TSV.

    Format of the published Margin-MSE teacher files (Zenodo 4068216), one triple per line.
    """
    expected = "'pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid'"
    for lineno, (ps, ns, qid, pos, neg) in _rows(path, (5,), expected):
        yield lineno, _number(path, lineno, ps, "pos_score"), _number(path, lineno, ns, "neg_score"), qid, pos, neg
