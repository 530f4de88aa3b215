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
``read_jsonl_scores``  ``{"qid": str, "pid": str, "score": number}``    teacher score files
=====================  ===============================================  =========================

Files are UTF-8 (a leading byte-order mark is dropped). Scores must be finite and fit a float32 (the stores
and the losses compute in float32): ``nan``, ``inf`` or ``1e39`` are malformed lines.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from kdir.errors import DataFormatError, EmptySplitError, MissingFileError

log = logging.getLogger(__name__)
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, line end kept) of a UTF-8 text file; a byte-order mark is dropped.

    A missing file raises :class:`~kdir.errors.MissingFileError`; bytes that are not UTF-8 raise
    :class:`~kdir.errors.DataFormatError` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8-sig") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> DataFormatError:
    """The error naming the first line of ``path`` that is not UTF-8 (read again, as bytes, to find it)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return DataFormatError(path, lineno, f"UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
    return DataFormatError(path, None, "UTF-8 text")


def _rows(
    path: str | Path, n_cols: tuple[int, ...], expected: str, sep: str | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for every non-blank line, checking the column count."""
    for lineno, line in text_lines(path):
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


def _score(path: str | Path, lineno: int, value: str | float, what: str = "score") -> float:
    """A score: a number that is finite in float32 (``nan``, ``inf``, ``1e39`` are malformed)."""
    try:
        x = _number(path, lineno, value, what) if isinstance(value, str) else float(value)
    except OverflowError:  # an integer beyond any float
        x = math.inf
    if not abs(x) <= FLOAT32_MAX:  # also NaN
        raise DataFormatError(path, lineno, f"{what} to be a finite float32 number (|x| <= 3.4e38)", got=str(value))
    return x


class _EmptyTexts:
    """Counts the rows without text of one file: an error at the first one, or one warning at the end."""

    def __init__(self, path: str | Path, allow: bool, expected: str):
        self.path, self.allow, self.expected, self.n = path, allow, expected, 0

    def check(self, lineno: int, text: str, line: str) -> None:
        if text.strip():
            return
        if not self.allow:
            raise DataFormatError(self.path, lineno, self.expected, got=line.strip())
        self.n += 1

    def report(self) -> None:
        if self.n:
            log.warning("%s: %d rows have an empty text (kept as empty texts)", self.path, self.n)


def read_jsonl_texts(
    path: str | Path, title_sep: str = " ", allow_empty: bool = True, with_title: bool = False
) -> Iterator[tuple[str, str]] | Iterator[tuple[str, str, str]]:
    """Yield ``(id, text)`` from a BEIR ``corpus.jsonl`` / ``queries.jsonl``, ``(id, text, title)`` if ``with_title``.

    A non-empty ``title`` is prepended to ``text`` with ``title_sep`` (the BEIR convention). ``text`` must be
    a string (``""`` for a document with a title only); ``title`` a string or absent / ``null`` (``""`` in the
    ``with_title`` triples). Rows whose title and text are both empty are an error unless ``allow_empty``
    (documents: one warning with their count; queries: pass ``False``).
    """
    expected = 'a JSON object with "_id" and a string "text"'
    empty = _EmptyTexts(path, allow_empty, 'a non-empty "text" (or "title")')
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            _id, text, title = obj["_id"], obj["text"], obj.get("title") or ""
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataFormatError(path, lineno, expected, got=line.strip()) from None
        if not isinstance(text, str) or not isinstance(title, str) or isinstance(_id, (dict, list)) or _id is None:
            raise DataFormatError(path, lineno, expected + ' (and "title", if any, a string)', got=line.strip())
        merged = f"{title}{title_sep}{text}" if title and text else title or text
        empty.check(lineno, merged, line)
        yield (str(_id), merged, title) if with_title else (str(_id), merged)
    empty.report()


def read_tsv_texts(path: str | Path, allow_empty: bool = True) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` from an MS MARCO style ``id \\t text`` file.

    An empty text is an error unless ``allow_empty`` (documents: one warning with their count).
    """
    empty = _EmptyTexts(path, allow_empty, "'id<TAB>text' with a non-empty text")
    for lineno, line in text_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        _id, sep, text = line.partition("\t")
        if not sep or not _id:
            raise DataFormatError(path, lineno, "'id<TAB>text'", got=line)
        empty.check(lineno, text, line)
        yield _id, text
    empty.report()


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
        run.setdefault(fields[0], {})[fields[2]] = _score(path, lineno, fields[4])
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
        yield lineno, qid, pid, _score(path, lineno, score)


def read_margin_scores(path: str | Path) -> Iterator[tuple[int, float, float, str, str, str]]:
    """Yield ``(line, pos_score, neg_score, qid, pos_pid, neg_pid)`` from Hofstätter et al.'s TSV.

    Format of the published Margin-MSE teacher files (Zenodo 4068216), one triple per line.
    """
    expected = "'pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid'"
    for lineno, (ps, ns, qid, pos, neg) in _rows(path, (5,), expected):
        yield lineno, _score(path, lineno, ps, "pos_score"), _score(path, lineno, ns, "neg_score"), qid, pos, neg


def read_jsonl_scores(path: str | Path) -> Iterator[tuple[int, str, str, float]]:
    """Yield ``(line, qid, pid, score)`` from ``{"qid": ..., "pid": ..., "score": ...}`` lines."""
    expected = 'a JSON object with "qid", "pid" and a numeric "score"'
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            qid, pid, score = str(obj["qid"]), str(obj["pid"]), obj["score"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataFormatError(path, lineno, expected, got=line.strip()) from None
        if isinstance(score, bool) or not isinstance(score, (int, float, str)):
            raise DataFormatError(path, lineno, expected, got=line.strip())
        yield lineno, qid, pid, _score(path, lineno, score)
