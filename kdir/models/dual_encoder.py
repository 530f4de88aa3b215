"""Dual encoder (bi-encoder) over any Hugging Face encoder.

``score(q, d) = <f_q(q), f_d(d)>`` where ``f`` = backbone → pooling (``cls`` / ``mean``, optionally
skipping leading marker tokens) → optional linear projection → optional L2 normalisation
(``similarity="cosine"``). Towers are shared (BERT-dot, Hofstätter et al. 2020) or separate. Each side has its
own :class:`SideSettings` (text prefix, length, final ``[SEP]`` or not, pooling); the document side takes the query
side's pooling unless told otherwise.

A **frozen document tower** (``freeze_doc_encoder``, EmbedDistill's asymmetric student, Kim et al. 2023) is a
teacher dual encoder's document encoder exactly: its tower (``doc/`` of a separate-tower teacher), tokenizer,
pooling, length, prefix, ``[SEP]`` layout, document projection and similarity are read from the teacher's folder
(``kdir_model.json`` or a sentence-transformers folder), frozen, and checked against anything the student sets.

Checkpoints are Hugging Face folders: the query tower and tokenizer at the top level (so
``AutoModel.from_pretrained(path)`` works anywhere), the document tower in ``doc/`` when it is
separate, and ``kdir_model.json`` (+ ``projection.safetensors``) for the rest. The same folder is a
sentence-transformers model (:mod:`kdir.models.st_format`): ``SentenceTransformer(path).encode_query`` /
``encode_document`` give kdir's query / document embeddings, and :meth:`DualEncoder.from_pretrained` reads any
sentence-transformers folder's pooling, normalisation, projection, lengths and prompts. As a teacher it scores the
batch's full query × document matrix, gathered at the candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdir.errors import ConfigError, MissingFileError
from kdir.models.base import CONFIG_NAME, Scorer, read_settings, to_device
from kdir.models.hf import check_chunk_size, fast_tokenizer, hidden_states, load_backbone
from kdir.models.st_format import (
    export_sentence_transformers,
    is_sentence_transformers_folder,
    read_sentence_transformers,
    save_tower_twice,
)

Side = Literal["query", "doc"]
# the values of settings left unset (None), for a model that inherits nothing
DEFAULTS: dict[str, Any] = dict(
    pooling="mean",
    skip_tokens=0,
    add_sep=True,
    similarity="dot",
    query_max_length=32,
    doc_max_length=256,
    query_prefix="",
    doc_prefix="",
)
# the settings of the document side a frozen document tower inherits from its teacher
DOC_KEYS = (
    "doc_pooling",
    "doc_skip_tokens",
    "doc_max_length",
    "doc_prefix",
    "doc_add_sep",
    "similarity",
    "doc_projection_dim",
)


@dataclass(frozen=True)
class SideSettings:
    """How the texts of one side (queries or documents) become vectors.

    Attributes:
        pooling: ``cls`` (position 0) or ``mean`` (over attended positions from ``skip_tokens`` on).
        skip_tokens: leading positions left out of the mean (TCT-ColBERT: 4, ``[CLS] [ q ]``).
        max_length: the most tokens a text keeps, special tokens included.
        prefix: text prepended before tokenisation (``"[Q] "``).
        add_sep: end each text with the tokenizer's ``[SEP]`` (BERT's layout); ``False``: ``[CLS]`` + text only
            (TCT-ColBERT, ``tokenization.py`` / pyserini's ``add_special_tokens=False``).
        mask_padding: pad to exactly ``max_length`` with attended ``[MASK]`` tokens (TCT-ColBERT's queries).
    """

    pooling: str
    skip_tokens: int
    max_length: int
    prefix: str
    add_sep: bool
    mask_padding: bool = False

    @property
    def skipped(self) -> int:
        """The leading positions the pooling leaves out (``cls`` pooling takes position 0 and skips nothing)."""
        return self.skip_tokens if self.pooling == "mean" else 0


def sides_of(settings: Mapping[str, Any]) -> tuple[SideSettings, SideSettings]:
    """The query and document :class:`SideSettings` that a dual encoder's settings describe (constructor arguments
    or a ``kdir_model.json``; unset or ``None``: :data:`DEFAULTS`; the unset ``doc_*`` pooling and layout settings:
    the query side's)."""
    s = DEFAULTS | {k: v for k, v in settings.items() if v is not None}
    query = SideSettings(
        s["pooling"],
        int(s["skip_tokens"]),
        int(s["query_max_length"]),
        s["query_prefix"],
        bool(s["add_sep"]),
        bool(s.get("query_mask_padding", False)),
    )
    doc = SideSettings(
        s.get("doc_pooling", s["pooling"]),
        int(s.get("doc_skip_tokens", s["skip_tokens"])),
        int(s["doc_max_length"]),
        s["doc_prefix"],
        bool(s.get("doc_add_sep", s["add_sep"])),
    )
    return query, doc


@dataclass
class TeacherDocSide:
    """A teacher dual encoder's document encoder, as a frozen document tower inherits it.

    Attributes:
        source: the file its settings were read from (for messages).
        tower: the document tower's folder (the teacher's top level when shared, else its ``doc/``).
        settings: the values of :data:`DOC_KEYS` (``doc_projection_dim``: the document projection's size or None).
        projection: the document projection's ``{"weight", "bias"}`` (None: the teacher projects no documents).
    """

    source: str
    tower: Path
    settings: dict[str, Any]
    projection: dict[str, Tensor] | None


def teacher_doc_side(folder: str | Path) -> TeacherDocSide | None:
    """The document encoder of a dual-encoder folder: a kdir folder (``kdir_model.json``) or a sentence-transformers
    folder; ``None`` for a plain Hugging Face folder or hub name (no settings to inherit)."""
    folder = Path(str(folder))
    saved = read_settings(folder)
    if saved:
        source = folder / CONFIG_NAME
        if "pooling" not in saved:
            raise ConfigError(f"{source}: not a dual encoder's settings (no 'pooling'): the document tower to freeze")
        shared = saved.get("shared", True)
        tower = folder if shared else folder / "doc"
        if saved.get("freeze_doc_encoder"):
            dim, key = saved.get("doc_projection_dim"), "doc."
        else:
            dim, key = saved.get("projection_dim"), "query." if shared else "doc."
        projection = None
        if dim:  # kdir saves a shared projection once, as "query.*"
            file = folder / "projection.safetensors"
            if not file.is_file():
                raise MissingFileError(f"{file}: no such file (the teacher's settings name a projection)")
            tensors = load_file(file)
            projection = {k.removeprefix(key): v for k, v in tensors.items() if k.startswith(key)}
    elif is_sentence_transformers_folder(folder):
        st = read_sentence_transformers(folder)
        saved, source = st.settings, str(st.source)
        shared = saved.get("shared", True)
        tower = Path(saved["model_name_or_path"] if shared else saved["doc_model_name_or_path"])
        projection = st.projections.get("query" if shared else "doc")
        dim = int(projection["weight"].shape[0]) if projection is not None else None
    else:
        return None
    _, doc = sides_of(saved)
    settings = dict(
        doc_pooling=doc.pooling,
        doc_skip_tokens=doc.skip_tokens,
        doc_max_length=doc.max_length,
        doc_prefix=doc.prefix,
        doc_add_sep=doc.add_sep,
        similarity=saved.get("similarity") or DEFAULTS["similarity"],
        doc_projection_dim=dim or None,
    )
    return TeacherDocSide(str(source), tower, settings, projection)


def _inherit(given: dict[str, Any], teacher: TeacherDocSide) -> dict[str, Any]:
    """The teacher's document settings, after checking that each one the student sets (non-None) agrees."""
    for key, theirs in teacher.settings.items():
        mine = given[key]
        if mine is not None and mine != theirs:
            raise ConfigError(
                f"{key}: the student sets {mine!r} but its frozen document tower's teacher ({teacher.source}) has "
                f"{theirs!r}: a frozen document tower is the teacher's document encoder exactly (leave {key} unset)"
            )
    return dict(teacher.settings)


class TextFormatter:
    """Turns raw texts of one side into model inputs: optional text prefix, truncation, padding.

    With ``mask_padding`` (TCT-ColBERT's queries, pyserini's ``"[CLS] [Q] " + q + "[MASK]" * 36``), every text
    is exactly ``max_length`` tokens: the padding (and the final ``[SEP]``, when there is one) become attended
    ``[MASK]`` tokens. Without ``add_sep`` a text is ``[CLS]`` + its tokens, ``max_length`` in all, with no final
    ``[SEP]`` (TCT-ColBERT's ``convert_to_colbert_input``). Light and picklable, so dataloader workers carry it
    instead of the model.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        prefix: str = "",
        mask_padding: bool = False,
        add_sep: bool = True,
    ):
        if mask_padding and tokenizer.mask_token_id is None:
            raise ConfigError("mask_padding needs a tokenizer with a [MASK] token")
        if not add_sep and tokenizer.cls_token_id is None:
            raise ConfigError("add_sep=false needs a tokenizer with a [CLS] token (texts are [CLS] + tokens)")
        self.tokenizer, self.max_length, self.prefix, self.mask_padding = tokenizer, max_length, prefix, mask_padding
        self.add_sep = add_sep

    def _tokenize(self, texts: Sequence[str], **kw: Any) -> Any:
        """The tokenizer's encoding of the prefixed, truncated texts: with ``[CLS]``/``[SEP]`` (``add_sep``), else
        the text's first ``max_length - 1`` tokens alone (the caller adds ``[CLS]``)."""
        texts = [self.prefix + t for t in texts] if self.prefix else list(texts)
        if self.add_sep:
            return self.tokenizer(texts, max_length=self.max_length, truncation=True, **kw)
        return self.tokenizer(texts, max_length=self.max_length - 1, truncation=True, add_special_tokens=False, **kw)

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        padding = "max_length" if self.mask_padding else True
        enc = self._tokenize(texts, return_tensors="pt", padding=padding)
        if self.add_sep:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            filler = (mask == 0) | (ids == self.tokenizer.sep_token_id)  # the final [SEP] becomes a [MASK] too
        else:  # [CLS] + the text's first max_length - 1 tokens
            n = len(enc["input_ids"])
            ids = torch.cat([torch.full((n, 1), self.tokenizer.cls_token_id), enc["input_ids"]], 1)
            mask = torch.cat([torch.ones(n, 1, dtype=enc["attention_mask"].dtype), enc["attention_mask"]], 1)
            filler = mask == 0
        if self.mask_padding:
            ids, mask = ids.masked_fill(filler, self.tokenizer.mask_token_id), torch.ones_like(mask)
        return {"input_ids": ids, "attention_mask": mask}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as :meth:`__call__` makes them, unpadded (what a pre-tokenised table holds:
        :class:`kdir.data.tokens.TokenTable`, padded on the right as here)."""
        if self.mask_padding:
            raise ConfigError("pre-tokenised texts are padded with [PAD]: not for mask_padding (TCT-ColBERT queries)")
        if self.tokenizer.padding_side != "right":
            raise ConfigError(f"pre-tokenised texts are padded on the right; the tokenizer pads on the "
                              f"{self.tokenizer.padding_side}")  # fmt: skip
        ids = self._tokenize(texts)["input_ids"]
        return ids if self.add_sep else [[self.tokenizer.cls_token_id, *i] for i in ids]


class DualPreparer:
    """A dual encoder's batch tokenisation: each query and each distinct document once (picklable, no weights)."""

    def __init__(self, query_formatter: TextFormatter, doc_formatter: TextFormatter, doc_table: Any = None):
        self.query_formatter, self.doc_formatter, self.doc_table = query_formatter, doc_formatter, doc_table

    def with_doc_table(self, table: Any) -> DualPreparer:
        """This preparer reading the documents' tokens from ``table`` (a :class:`kdir.data.tokens.TokenTable` of the
        corpus, built with :attr:`doc_formatter`) when a batch gives their corpus rows."""
        return DualPreparer(self.query_formatter, self.doc_formatter, table)

    def __call__(
        self,
        queries: Sequence[str],
        docs: Sequence[str],
        candidates: np.ndarray | Tensor,
        doc_rows: np.ndarray | None = None,
    ) -> dict:
        """``{"query", "doc", "candidates"}``: ``candidates [B, C]`` index the batch's distinct ``docs``; with a
        document table and ``doc_rows`` (the corpus rows of ``docs``), their tokens come from the table."""
        table = self.doc_table is not None and doc_rows is not None
        return {
            "query": self.query_formatter(queries),
            "doc": self.doc_table.batch(doc_rows) if table else self.doc_formatter(docs),
            "candidates": torch.as_tensor(np.asarray(candidates), dtype=torch.long),
        }


class DualEncoder(Scorer):
    """A bi-encoder student (or teacher) over Hugging Face backbones.

    Settings of the document side left unset (``None``) take the query side's pooling, :data:`DEFAULTS`
    otherwise, or, for a frozen document tower read from a teacher's folder, the teacher's.

    Args:
        model_name_or_path: hub name or local folder of the (query) backbone, or a kdir checkpoint.
        pooling: ``cls`` (first token) or ``mean`` (over non-padding tokens), of queries (and of documents
            unless ``doc_pooling`` says otherwise).
        skip_tokens: leading tokens left out of mean pooling (e.g. 4 for TCT-ColBERT's ``[CLS] [ q ]``).
        shared: one backbone for queries and documents (the default) or two towers.
        doc_model_name_or_path: document backbone when ``shared=False`` (defaults to the query one); with
            ``freeze_doc_encoder``, the teacher dual encoder's folder (its document tower and settings; a plain
            Hugging Face folder has no settings to inherit, so the student's document settings apply).
        projection_dim: add a linear map to this size after pooling (``None``: no projection).
        similarity: ``dot`` (raw inner product) or ``cosine`` (L2-normalised embeddings, inner product).
        query_max_length / doc_max_length: truncation lengths in tokens.
        query_prefix / doc_prefix: text markers prepended before tokenisation (e.g. ``"[Q] "``).
        query_mask_padding: pad queries with attended ``[MASK]`` tokens to ``query_max_length`` (TCT-ColBERT).
        freeze_doc_encoder: keep the document tower (its tokenizer and projection) exactly as inherited: no
            gradients, always in eval mode (EmbedDistill's asymmetric student takes the teacher's document
            encoder); the query tower is then projected to the document side's size when the two differ.
        tokenizer_name_or_path: tokenizer source if not the model folder.
        add_sep: end texts with ``[SEP]`` (BERT's layout; documents too unless ``doc_add_sep``); ``False``:
            ``[CLS]`` + text only, as TCT-ColBERT and pyserini's TCT encoders.
        doc_pooling / doc_skip_tokens / doc_add_sep: the document side's own values (separate towers only).
        doc_projection_dim: a frozen document tower's own projection size (the teacher's document projection).
        attn_implementation: the backbones' attention kernel, ``sdpa`` or ``eager`` (``None``: transformers'
            default; :mod:`kdir.models.hf`). Speed only: not saved, not part of the provenance.
        encode_chunk_size: run the backbone over at most this many sequences per pass, the passes joined
            (``None``: a batch in one pass; :func:`kdir.models.hf.hidden_states`). Speed only: not saved.
    """

    name = "dual_encoder"
    separable = True
    non_scoring = ("freeze_doc_encoder",)  # a training setting: a frozen teacher scores the same either way
    later_settings = {  # per-side settings, at the values of the versions before them
        "add_sep": True,
        "doc_pooling": None,
        "doc_skip_tokens": None,
        "doc_add_sep": None,
        "doc_projection_dim": None,
    }

    def __init__(
        self,
        model_name_or_path: str | Path,
        pooling: Literal["cls", "mean"] = "mean",
        skip_tokens: int = 0,
        shared: bool = True,
        doc_model_name_or_path: str | Path | None = None,
        projection_dim: int | None = None,
        similarity: Literal["dot", "cosine"] | None = None,
        query_max_length: int = 32,
        doc_max_length: int | None = None,
        query_prefix: str = "",
        doc_prefix: str | None = None,
        query_mask_padding: bool = False,
        freeze_doc_encoder: bool = False,
        tokenizer_name_or_path: str | Path | None = None,
        add_sep: bool = True,
        doc_pooling: Literal["cls", "mean"] | None = None,
        doc_skip_tokens: int | None = None,
        doc_add_sep: bool | None = None,
        doc_projection_dim: int | None = None,
        attn_implementation: Literal["sdpa", "eager"] | None = None,
        encode_chunk_size: int | None = None,
    ):
        super().__init__()
        self.encode_chunk_size = check_chunk_size(encode_chunk_size)
        if freeze_doc_encoder and shared:
            raise ConfigError("freeze_doc_encoder needs separate towers (shared=false)")
        path = Path(str(model_name_or_path))
        doc_path = doc_model_name_or_path
        if doc_path is None and not shared and (path / "doc").is_dir():
            doc_path = path / "doc"
        doc = dict(
            doc_pooling=doc_pooling,
            doc_skip_tokens=doc_skip_tokens,
            doc_max_length=doc_max_length,
            doc_prefix=doc_prefix,
            doc_add_sep=doc_add_sep,
            similarity=similarity,
            doc_projection_dim=doc_projection_dim,
        )
        teacher = teacher_doc_side(doc_path) if freeze_doc_encoder and doc_path is not None else None
        if teacher is not None:
            doc, doc_path = _inherit(doc, teacher), teacher.tower
        q, d = sides_of(
            dict(
                pooling=pooling,
                skip_tokens=skip_tokens,
                query_max_length=query_max_length,
                query_prefix=query_prefix,
                query_mask_padding=query_mask_padding,
                add_sep=add_sep,
                **doc,
            )
        )
        self.sides: dict[str, SideSettings] = {"query": q, "doc": d}
        self._check(q, d, shared, freeze_doc_encoder, projection_dim, doc)

        def own(doc_value: Any, query_value: Any) -> Any:  # a document setting of its own, else None (the query's)
            return doc_value if freeze_doc_encoder or doc_value != query_value else None

        self.config = dict(
            pooling=q.pooling,
            skip_tokens=q.skip_tokens,
            shared=shared,
            projection_dim=projection_dim,
            similarity=doc["similarity"] or DEFAULTS["similarity"],
            query_max_length=q.max_length,
            doc_max_length=d.max_length,
            query_prefix=q.prefix,
            doc_prefix=d.prefix,
            query_mask_padding=q.mask_padding,
            freeze_doc_encoder=freeze_doc_encoder,
            add_sep=q.add_sep,
            doc_pooling=own(d.pooling, q.pooling),
            doc_skip_tokens=own(d.skip_tokens, q.skip_tokens),
            doc_add_sep=own(d.add_sep, q.add_sep),
            doc_projection_dim=doc["doc_projection_dim"] if freeze_doc_encoder else None,
        )
        self.query_encoder = load_backbone(model_name_or_path, attn_implementation)
        self.doc_encoder = (
            self.query_encoder if shared else load_backbone(doc_path or model_name_or_path, attn_implementation)
        )
        self.tokenizer = fast_tokenizer(tokenizer_name_or_path or model_name_or_path)
        doc_tokenizer = self.tokenizer
        if freeze_doc_encoder and doc_path is not None:  # the inherited tower keeps its own vocabulary
            doc_tokenizer = fast_tokenizer(doc_path)
        self._build_projections(projection_dim)
        if (path / "projection.safetensors").is_file():
            self._load_projection(path / "projection.safetensors")
        if teacher is not None and teacher.projection is not None:
            self.doc_projection.load_state_dict(teacher.projection)
        self.query_formatter = TextFormatter(self.tokenizer, q.max_length, q.prefix, q.mask_padding, q.add_sep)
        self.doc_formatter = TextFormatter(doc_tokenizer, d.max_length, d.prefix, add_sep=d.add_sep)
        if freeze_doc_encoder:
            self.doc_encoder.requires_grad_(False)
            self.doc_encoder.eval()
            if self.doc_projection is not None:
                self.doc_projection.requires_grad_(False)

    @staticmethod
    def _check(
        q: SideSettings,
        d: SideSettings,
        shared: bool,
        frozen: bool,
        projection_dim: int | None,
        doc: dict[str, Any],
    ) -> None:
        for key, side in (("pooling", q), ("doc_pooling", d)):
            if side.pooling not in ("cls", "mean"):
                raise ConfigError(f"{key} must be 'cls' or 'mean', got {side.pooling!r}")
        if doc["similarity"] not in (None, "dot", "cosine"):
            raise ConfigError(f"similarity must be 'dot' or 'cosine', got {doc['similarity']!r}")
        if shared and (q.pooling, q.skipped, q.add_sep) != (d.pooling, d.skipped, d.add_sep):
            raise ConfigError(
                "doc_pooling / doc_skip_tokens / doc_add_sep differ from the query side's: one shared tower pools "
                "and lays out both sides alike (set shared=false for a document tower of its own)"
            )
        if not frozen and doc["doc_projection_dim"] not in (None, projection_dim):
            raise ConfigError(
                f"doc_projection_dim={doc['doc_projection_dim']} is a frozen document tower's own projection: "
                f"set freeze_doc_encoder=true, or projection_dim for both sides"
            )

    def _build_projections(self, projection_dim: int | None) -> None:
        hidden, doc_hidden = self.query_encoder.config.hidden_size, self.doc_encoder.config.hidden_size
        if self.config["freeze_doc_encoder"]:  # the query side is projected onto the frozen document side's space
            doc_dim = self.config["doc_projection_dim"]
            self.doc_projection = nn.Linear(doc_hidden, doc_dim) if doc_dim else None
            out = doc_dim or doc_hidden
            if projection_dim is not None and projection_dim != out:
                raise ConfigError(f"projection_dim={projection_dim} must equal the frozen document side's size {out}")
            self.query_projection = nn.Linear(hidden, out) if out != hidden or projection_dim else None
            self.config["projection_dim"] = out if self.query_projection is not None else None
        else:
            self.query_projection = nn.Linear(hidden, projection_dim) if projection_dim else None
            own = not self.config["shared"] and projection_dim
            self.doc_projection = nn.Linear(doc_hidden, projection_dim) if own else self.query_projection

    def train(self, mode: bool = True) -> DualEncoder:
        """As ``nn.Module.train``, but a frozen document tower stays in eval mode (no dropout)."""
        super().train(mode)
        if self.config.get("freeze_doc_encoder"):
            self.doc_encoder.eval()
        return self

    @property
    def dim(self) -> int:
        return self.config["projection_dim"] or self.query_encoder.config.hidden_size

    def side(self, side: Side) -> SideSettings:
        """The text layout and pooling of ``side``."""
        return self.sides[side]

    def formatter(self, side: Side) -> TextFormatter:
        return self.query_formatter if side == "query" else self.doc_formatter

    def pool(self, hidden: Tensor, mask: Tensor, side: Side = "query") -> Tensor:
        """Pool token states ``[N, L, H]`` with attention mask ``[N, L]`` into ``[N, H]``, as ``side`` pools."""
        settings = self.sides[side]
        if settings.pooling == "cls":
            return hidden[:, 0]
        mask = mask.to(hidden.dtype)
        if settings.skip_tokens:
            mask = mask.clone()
            mask[:, : settings.skip_tokens] = 0
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    def encode(self, tokens: dict[str, Tensor], side: Side) -> Tensor:
        """Embed tokenised texts of one side: ``[N, dim]``."""
        encoder = self.query_encoder if side == "query" else self.doc_encoder
        hidden = hidden_states(encoder, tokens["input_ids"], tokens["attention_mask"], self.encode_chunk_size)
        emb = self.pool(hidden, tokens["attention_mask"], side)
        proj = self.query_projection if side == "query" else self.doc_projection
        if proj is not None:
            emb = proj(emb)
        if self.config["similarity"] == "cosine":
            emb = nn.functional.normalize(emb, dim=-1)
        return emb

    @property
    def embeds(self) -> bool:
        return True

    @staticmethod
    def score_matrix(queries: Tensor, docs: Tensor) -> Tensor:
        """Full score matrix ``[Nq, Nd]`` (inner product; cosine when embeddings are normalised)."""
        return queries @ docs.T

    def preparer(self) -> DualPreparer:
        """Tokenisation of a batch (CPU, in dataloader workers): each query and each distinct document once."""
        return DualPreparer(self.query_formatter, self.doc_formatter)

    def embed(self, inputs: dict) -> tuple[Tensor, Tensor]:
        """Embeddings of a prepared batch: queries ``[B, dim]`` and its distinct documents ``[D, dim]``."""
        inputs = to_device(inputs, self.device)
        return self.encode(inputs["query"], "query"), self.encode(inputs["doc"], "doc")

    def forward(self, inputs: dict) -> Tensor:
        """Scores ``[B, C]`` of the prepared batch: every document encoded once, full matrix, then gathered."""
        q, d = self.embed(inputs)
        return self.score_reps((q,), (d,), inputs["candidates"])  # [B, C]

    def query_reps(self, queries: Sequence[str], query_keys: np.ndarray | None = None) -> tuple[Tensor]:
        """Query embeddings ``(q [B, dim],)``."""
        return (self.encode(to_device(self.query_formatter(queries), self.device), "query"),)

    def score_reps(self, queries: tuple[Tensor, ...], docs: tuple[Tensor, ...], candidates: Tensor) -> Tensor:
        """Inner products of ``(q,)`` and ``(d [D, dim],)``, gathered at ``candidates``."""
        scores = self.score_matrix(queries[0], docs[0].to(queries[0].dtype)).float()
        return scores.gather(1, candidates.to(scores.device))

    def outputs(self, inputs: dict, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``[B, C]``, query embeddings ``[B, dim]`` and each query's ``positive``-column document's
        embedding ``[B, dim]`` (rows with ``positive < 0`` take column 0: undefined for embedding matching)."""
        q, d = self.embed(inputs)
        return self.outputs_of(q, d, inputs["candidates"], positive)

    def outputs_of(self, q: Tensor, d: Tensor, candidates: Tensor, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`outputs` from query ``[B, dim]`` and distinct-document ``[D, dim]`` embeddings (e.g. cached)."""
        cand = candidates.to(q.device)
        own = cand.gather(1, positive.clamp(min=0).to(cand.device)[:, None])[:, 0]
        return self.score_matrix(q, d).float().gather(1, cand), q, d[own]

    def _save(self, path: Path) -> None:
        """The query tower + tokenizer at the top level (``AutoModel.from_pretrained`` works), the document tower in
        ``doc/`` when separate, the projections in ``projection.safetensors`` (``query.*``, and ``doc.*`` when the
        document side has one of its own), and the sentence-transformers files (separate towers: the query tower
        also in ``query/``, as hard links to the top-level files)."""
        if self.config["shared"]:
            self.query_encoder.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        else:
            save_tower_twice(self.query_encoder, self.tokenizer, path)
            self.doc_encoder.save_pretrained(path / "doc")
            self.doc_formatter.tokenizer.save_pretrained(path / "doc")
        tensors = {}
        if self.query_projection is not None:
            tensors |= {f"query.{k}": v for k, v in self.query_projection.state_dict().items()}
        if self.doc_projection is not None and self.doc_projection is not self.query_projection:
            tensors |= {f"doc.{k}": v for k, v in self.doc_projection.state_dict().items()}
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, path / "projection.safetensors")
        export_sentence_transformers(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DualEncoder:
        """Load a kdir folder (its saved settings), a sentence-transformers folder (a ``modules.json`` and no
        ``kdir_model.json``: the settings its modules describe, its ``Dense`` weights as the projections) or any HF
        model (the defaults); non-``None`` ``overrides`` win over all of them."""
        if not is_sentence_transformers_folder(path):
            return super().from_pretrained(path, **overrides)
        st = read_sentence_transformers(path)
        settings = st.settings | {k: v for k, v in overrides.items() if v is not None}
        frozen = settings.get("freeze_doc_encoder")
        if st.doc_vocabulary and not settings.get("shared") and not frozen:
            raise ConfigError(
                f"{st.source}: the document tower has a vocabulary of its own, which kdir reads for a frozen "
                "document tower only: set freeze_doc_encoder=true"
            )
        if frozen and "doc" in st.projections:  # the document route's Dense: the frozen tower's own projection
            settings.setdefault("doc_projection_dim", int(st.projections["doc"]["weight"].shape[0]))
        model = cls(**settings)
        st.load_projections(model)
        return model

    def _load_projection(self, file: Path) -> None:
        tensors = load_file(file)
        for prefix, linear in (("query.", self.query_projection), ("doc.", self.doc_projection)):
            weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            if linear is not None and weights and (prefix == "query." or linear is not self.query_projection):
                linear.load_state_dict(weights)
