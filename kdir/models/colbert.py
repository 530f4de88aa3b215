"""ColBERT late-interaction model (Khattab & Zaharia 2020), with the variants of the papers kdir reproduces.

Each token is embedded by BERT → a linear map to ``dim`` (no bias) → L2 normalisation. Queries are
``[CLS] [unused0] q [SEP]`` padded with ``[MASK]`` to ``query_max_length`` (query augmentation: the ``[MASK]`` tokens
take part in MaxSim; attended by default, not attended with ``attend_to_mask_tokens=False`` as in ColBERT v1 and
CollectiveKD); documents are ``[CLS] [unused1] d [SEP]`` truncated to ``doc_max_length``, with padding and
punctuation (ColBERT's ``skiplist``) masked. ``score(q, d) = Σ_i max_j sim(q_i, d_j)`` with ``sim`` the cosine or
the negative squared L2 distance.

Masked document tokens are left out of the max (``masked_doc_tokens="exclude"``, ColBERTv2), or kept as zero
vectors (``"zero"``: ColBERT v1 / CollectiveKD's ``D * mask``, ``colbert/modeling/colbert.py:50-53``, a floor of
``sim(q_i, 0)`` = 0 or ``−‖q_i‖²``), or score a constant (TCT-ColBERT: −15, ``train/loss.py:63``). TCT-ColBERT's
teacher (``castorini/tct_colbert`` ``train/model_fn.py:57-66``, ``tfrecord_generation/tokenization.py``) is
``[CLS] [ q ] q [MASK]…`` / ``[CLS] [ d ] d`` (literal ``"[Q] "``/``"[D] "`` text, no ``[SEP]``), the first 4
positions dropped: ``marker_as_text=True``, ``add_sep=False``, ``skip_prefix_tokens=4``.

Loads kdir folders (HF backbone + ``colbert_linear.safetensors``) and the layout of published checkpoints
(e.g. ``colbert-ir/colbertv2.0``: one weights file with ``bert.*`` and ``linear.weight``); ColBERT v1's
``colbert.dnn`` files convert with :mod:`kdir.models.released`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.utils import cached_file

from kdir.errors import ConfigError
from kdir.models.base import Scorer, as_candidates, to_device
from kdir.models.hf import backbone_from_config, check_chunk_size, fast_tokenizer, hidden_states, load_backbone

Side = Literal["query", "doc"]
Similarity = Literal["cosine", "l2"]
MaskedDocTokens = Literal["exclude", "zero"] | float
LINEAR_NAME = "colbert_linear.safetensors"
# Settings added after score stores began recording ColBERT's provenance, with the value earlier versions always
# used: a setting at that value is left out of the provenance, so existing stores of a default ColBERT still match.
LATER_SETTINGS = {
    "masked_doc_tokens": "exclude",
    "marker_as_text": False,
    "add_sep": True,
    "skip_prefix_tokens": 0,
    "dropout_when_frozen": False,
}


def check_masked_doc_tokens(value: MaskedDocTokens) -> MaskedDocTokens:
    """``exclude``, ``zero`` or a finite number (as float); anything else is a :class:`ConfigError`."""
    if value in ("exclude", "zero"):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ConfigError(
        f"masked_doc_tokens must be 'exclude', 'zero' or a finite number (e.g. -15.0, TCT-ColBERT's), got {value!r}"
    )


def maxsim(
    q: Tensor,
    q_mask: Tensor,
    d: Tensor,
    d_mask: Tensor,
    similarity: Similarity = "cosine",
    chunk_size: int = 0,
    masked_doc_tokens: MaskedDocTokens = "exclude",
) -> Tensor:
    """Late-interaction scores ``[Nq, Nd]``: ``Σ_i w_i max_j sim(q_i, d_j)``.

    The similarities ``[Nq, chunk, Lq, Ld]`` (the bulk of the work and memory) are computed in the dtype of the
    embeddings (bf16 under autocast: tensor cores, half the traffic; ``q`` and ``d`` of different dtypes meet in
    their promoted one); each query token's maximum is upcast before the weighted sum, so the scores are fp32.

    Args:
        q / d: token embeddings ``[Nq, Lq, dim]`` / ``[Nd, Ld, dim]``.
        q_mask: ``[Nq, Lq]`` bool (weight 1 where ``True``) or float weights ``w_i``.
        d_mask: ``[Nd, Ld]`` bool, ``True`` where a document token takes part.
        similarity: ``cosine`` (inner product; embeddings are expected unit-norm) or ``l2`` (``-‖q_i - d_j‖²``).
        chunk_size: documents per chunk (0: sized so each ``[Nq, chunk, Lq, Ld]`` block has ≤ 2^25 entries).
        masked_doc_tokens: what a masked position of a document is. ``exclude``: nothing (left out of the max; a
            document without tokens scores 0). ``zero``: a zero vector, as ColBERT v1's ``D * mask``: every document
            with a masked position (padding included) adds ``sim(q_i, 0)`` (0, or ``−‖q_i‖²`` for ``l2``) to the
            candidates of the max. A number: that similarity, the same way (TCT-ColBERT: −15).
    """
    if similarity not in ("cosine", "l2"):
        raise ConfigError(f"similarity must be 'cosine' or 'l2', got {similarity!r}")
    masked_doc_tokens = check_masked_doc_tokens(masked_doc_tokens)
    n_q, l_q, _ = q.shape
    n_d, l_d, _ = d.shape
    chunk_size = chunk_size or max(1, 2**25 // max(1, n_q * l_q * l_d))
    dtype = torch.promote_types(q.dtype, d.dtype)
    q, d = q.to(dtype), d.to(dtype)
    q_weights = q_mask.to(torch.float32)
    # l2: -‖q_i - d_j‖² = 2 q_i·d_j - ‖q_i‖² - ‖d_j‖² is a difference of terms near 2 (unit vectors) whose result is
    # near 0: in bf16 (spacing 2^-6 at 2) each term would add as much rounding again as the dot product's own, so the
    # norms and the difference stay fp32 (as under autocast before); the dot products are in the input dtype
    q_sq = q.float().pow(2).sum(-1) if similarity == "l2" else None  # [Nq, Lq]
    floor = None  # [Nq, 1, Lq]: the similarity of each query token to a masked position
    if masked_doc_tokens == "zero":
        floor = -q_sq[:, None, :] if similarity == "l2" else q.new_zeros(n_q, 1, l_q, dtype=torch.float32)
    elif masked_doc_tokens != "exclude":
        floor = q.new_full((n_q, 1, l_q), masked_doc_tokens, dtype=torch.float32)
    out = []
    for s in range(0, n_d, chunk_size):
        dc, mc = d[s : s + chunk_size], d_mask[s : s + chunk_size].bool()
        sim = torch.einsum("qid,njd->qnij", q, dc)  # [Nq, n, Lq, Ld], in the input dtype
        if similarity == "l2":
            sim = 2 * sim.float() - q_sq[:, None, :, None] - dc.float().pow(2).sum(-1)[None, :, None, :]
        best = sim.masked_fill(~mc[None, :, None, :], float("-inf")).max(-1).values.float()  # [Nq, n, Lq]
        if floor is None:
            best = best.masked_fill(~mc.any(-1)[None, :, None], 0.0)  # a document without tokens scores 0
        else:
            has_masked = (~mc).any(-1)[None, :, None]  # [1, n, 1]
            best = torch.where(has_masked, torch.maximum(best, floor), best)
        out.append((best * q_weights[:, None, :]).sum(-1))
    return torch.cat(out, dim=1) if out else q.new_zeros(n_q, 0, dtype=torch.float32)


def _published_state(path: str | Path) -> dict[str, Tensor] | None:
    """The state dict of a published ColBERT checkpoint (``bert.*`` + ``linear.weight``), else ``None``."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        file = cached_file(
            str(path),
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if file is None:
            continue
        if filename.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                keys = set(f.keys())
            if "linear.weight" not in keys or not any(k.startswith("bert.") for k in keys):
                return None
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
        published = "linear.weight" in state and any(k.startswith("bert.") for k in state)
        return state if published else None
    return None


class ColBERTFormatter:
    """ColBERT's input format of one side (picklable: dataloader workers carry it instead of the model).

    ``[CLS] marker text [SEP]`` (``add_sep=False``: no ``[SEP]``; ``marker_as_text=True``: ``marker + " "`` is
    prepended to the text and tokenised with it instead of inserted as one token). Queries are ``[MASK]``-padded
    to exactly ``max_length`` (attended unless ``attend_to_mask_tokens=False``), documents truncated to
    ``max_length`` and padded to the batch's longest.
    """

    def __init__(
        self,
        tokenizer,
        side: Side,
        marker: str,
        max_length: int,
        attend_to_mask_tokens: bool = True,
        marker_as_text: bool = False,
        add_sep: bool = True,
    ):
        self.tokenizer, self.side, self.max_length = tokenizer, side, max_length
        self.attend_to_mask_tokens, self.add_sep = attend_to_mask_tokens, add_sep
        self.prefix = f"{marker} " if marker_as_text else ""
        self.marker_id = None if marker_as_text else tokenizer.convert_tokens_to_ids(marker)
        self.budget = max_length - 1 - (self.marker_id is not None) - add_sep  # word pieces of the text
        if self.budget < 1:
            raise ConfigError(f"{side}_max_length={max_length} leaves no room for text after [CLS] and the markers")

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        tok = self.tokenizer
        pieces = tok(
            [self.prefix + t for t in texts], add_special_tokens=False, truncation=True, max_length=self.budget
        )["input_ids"]
        head = [tok.cls_token_id] + ([self.marker_id] if self.marker_id is not None else [])
        tail = [tok.sep_token_id] if self.add_sep else []
        rows = [head + p + tail for p in pieces]
        is_query = self.side == "query"
        width = self.max_length if is_query else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.mask_token_id if is_query else tok.pad_token_id, dtype=torch.long)
        mask = torch.full_like(ids, int(is_query and self.attend_to_mask_tokens))  # query padding: [MASK]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ColBERTPreparer:
    """ColBERT's batch tokenisation: the queries and each distinct candidate document once (picklable)."""

    def __init__(self, query_formatter: ColBERTFormatter, doc_formatter: ColBERTFormatter):
        self.query_formatter, self.doc_formatter = query_formatter, doc_formatter

    def __call__(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor
    ) -> dict[str, Tensor]:
        """``query_*`` / ``doc_*`` token tensors and ``candidates [B, C]`` into the distinct ``docs``."""
        cand = as_candidates(candidates, len(queries), len(docs))
        q, d = self.query_formatter(queries), self.doc_formatter(list(docs))
        return {f"query_{k}": v for k, v in q.items()} | {f"doc_{k}": v for k, v in d.items()} | {"candidates": cand}


class ColBERT(Scorer):
    """A ColBERT (teacher or student): token embeddings and MaxSim.

    Args:
        model_name_or_path: a kdir ColBERT folder, a published ColBERT checkpoint (``bert.*`` + ``linear.weight``),
            or a plain encoder (the linear map is then newly initialised).
        dim: token embedding size of a new linear map (a saved one, kdir or published, decides it, and its bias).
        similarity: ``cosine`` or ``l2``.
        query_max_length: queries are truncated or ``[MASK]``-padded to exactly this many tokens.
        doc_max_length: documents are truncated to this many tokens.
        mask_punctuation: leave document tokens that are single punctuation characters out of MaxSim.
        attend_to_mask_tokens: let the encoder attend to the query's ``[MASK]`` padding (``False``: embedded, in
            MaxSim, but attention 0, as ColBERT v1 / CollectiveKD's ``QueryTokenizer`` and ColBERTv2).
        query_marker / doc_marker: the tokens inserted after ``[CLS]`` (or the text prepended, ``marker_as_text``).
        normalize_queries: L2-normalise query token embeddings (ColBERT); TCT-ColBERT's teacher leaves them
            unnormalised (documents are always normalised).
        bias: a bias in the linear map (TCT-ColBERT's teacher has one; ColBERT has none).
        masked_doc_tokens: ``exclude``, ``zero`` or a number: see :func:`maxsim` (ColBERT v1 / CollectiveKD:
            ``zero``; TCT-ColBERT: −15).
        marker_as_text: prepend ``"<marker> "`` to the text (TCT-ColBERT's literal ``"[Q] "``/``"[D] "``, three word
            pieces) instead of inserting the marker token after ``[CLS]``.
        add_sep: end each sequence with ``[SEP]`` (ColBERT); TCT-ColBERT's teacher has none.
        skip_prefix_tokens: leading positions of both sides left out of MaxSim (TCT-ColBERT: 4, ``[CLS] [ q ]``).
        dropout_when_frozen: keep dropout active when frozen as a teacher (TCT-ColBERT scores its teacher with
            ``is_training=True``, ``train/model_fn.py:80-93``). Evaluation and :meth:`score` still run in eval mode;
            ``kdir.score`` would store noisy scores: turn it off there. Not saved with the folder.
        attn_implementation: the backbone's attention kernel, ``sdpa`` or ``eager`` (``None``: transformers'
            default; :mod:`kdir.models.hf`). Speed only: not saved, not part of the provenance.
        encode_chunk_size: run the backbone over at most this many sequences per pass, the passes joined
            (``None``: a batch in one pass; :func:`kdir.models.hf.hidden_states`). Speed only: not saved.
    """

    name = "colbert"
    multi_vector = True  # a student of this kind is evaluated by MaxSim, not single-vector FAISS search
    separable = True
    later_settings = LATER_SETTINGS

    def __init__(
        self,
        model_name_or_path: str | Path,
        dim: int = 128,
        similarity: Similarity = "cosine",
        query_max_length: int = 32,
        doc_max_length: int = 180,
        mask_punctuation: bool = True,
        attend_to_mask_tokens: bool = True,
        query_marker: str = "[unused0]",
        doc_marker: str = "[unused1]",
        normalize_queries: bool = True,
        bias: bool = False,
        masked_doc_tokens: MaskedDocTokens = "exclude",
        marker_as_text: bool = False,
        add_sep: bool = True,
        skip_prefix_tokens: int = 0,
        dropout_when_frozen: bool = False,
        attn_implementation: Literal["sdpa", "eager"] | None = None,
        encode_chunk_size: int | None = None,
    ):
        super().__init__()
        self.encode_chunk_size = check_chunk_size(encode_chunk_size)
        if similarity not in ("cosine", "l2"):
            raise ConfigError(f"similarity must be 'cosine' or 'l2', got {similarity!r}")
        masked_doc_tokens = check_masked_doc_tokens(masked_doc_tokens)
        if not isinstance(skip_prefix_tokens, int) or skip_prefix_tokens < 0:
            raise ConfigError(f"skip_prefix_tokens must be an integer >= 0, got {skip_prefix_tokens!r}")
        path = Path(str(model_name_or_path))
        self.tokenizer = fast_tokenizer(model_name_or_path)
        vocab = self.tokenizer.get_vocab()
        markers = () if marker_as_text else (query_marker, doc_marker)
        for token in (*markers, self.tokenizer.mask_token):
            if token not in vocab:
                raise ConfigError(f"{model_name_or_path}: the tokenizer has no {token!r} token")
        skip = sorted({vocab[p] for p in string.punctuation if p in vocab}) if mask_punctuation else []
        self.register_buffer("skip_ids", torch.tensor(skip, dtype=torch.long), persistent=False)

        state = None if (path / LINEAR_NAME).is_file() else _published_state(model_name_or_path)
        if state is not None:  # published layout: one file with bert.* and linear.weight
            self.bert = backbone_from_config(model_name_or_path, attn_implementation)
            bert = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
            missing, unexpected = self.bert.load_state_dict(bert, strict=False)
            unexpected = [k for k in unexpected if not k.startswith("pooler.") and not k.endswith("position_ids")]
            if missing or unexpected:
                raise ConfigError(
                    f"{model_name_or_path}: ColBERT weights do not fit the backbone "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            dim = state["linear.weight"].shape[0]
            bias = "linear.bias" in state
        else:
            self.bert = load_backbone(model_name_or_path, attn_implementation)
        saved = load_file(path / LINEAR_NAME) if state is None and (path / LINEAR_NAME).is_file() else None
        if saved is not None:  # a kdir folder: its linear map decides the size and the bias
            dim, bias = saved["weight"].shape[0], "bias" in saved
        self.linear = nn.Linear(self.bert.config.hidden_size, dim, bias=bias)
        if state is not None:
            self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        elif saved is not None:
            self.linear.load_state_dict(saved)
        self.config = dict(
            dim=dim,
            similarity=similarity,
            query_max_length=query_max_length,
            doc_max_length=doc_max_length,
            mask_punctuation=mask_punctuation,
            attend_to_mask_tokens=attend_to_mask_tokens,
            query_marker=query_marker,
            doc_marker=doc_marker,
            normalize_queries=normalize_queries,
            bias=bias,
            masked_doc_tokens=masked_doc_tokens,
            marker_as_text=marker_as_text,
            add_sep=add_sep,
            skip_prefix_tokens=skip_prefix_tokens,
            dropout_when_frozen=dropout_when_frozen,
        )
        layout = dict(marker_as_text=marker_as_text, add_sep=add_sep)
        self.query_formatter = ColBERTFormatter(
            self.tokenizer, "query", query_marker, query_max_length, attend_to_mask_tokens, **layout
        )
        self.doc_formatter = ColBERTFormatter(self.tokenizer, "doc", doc_marker, doc_max_length, **layout)

    def tokenize(self, texts: Sequence[str], side: Side) -> dict[str, Tensor]:
        """``[CLS] marker text [SEP]``; queries ``[MASK]``-padded to ``query_max_length``, documents truncated."""
        return self.formatter(side)(texts)

    def formatter(self, side: Side) -> ColBERTFormatter:
        return self.query_formatter if side == "query" else self.doc_formatter

    def encode(self, inputs: dict[str, Tensor], side: Side) -> tuple[Tensor, Tensor]:
        """Token embeddings ``[N, L, dim]`` and the MaxSim mask ``[N, L]`` (bool) of one side.

        Embeddings are unit-norm, except query tokens with ``normalize_queries=False``. Every query position takes
        part ([MASK] padding included) and the document tokens that are neither padding nor punctuation, except
        the first ``skip_prefix_tokens`` positions of both.
        """
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        emb = self.linear(hidden_states(self.bert, ids, attention, self.encode_chunk_size))
        if side == "doc" or self.config["normalize_queries"]:
            emb = nn.functional.normalize(emb, dim=-1)
        if side == "query":
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = attention.bool() & ~torch.isin(ids, self.skip_ids)
        if self.config["skip_prefix_tokens"]:
            mask[:, : self.config["skip_prefix_tokens"]] = False
        return emb, mask

    def freeze(self) -> ColBERT:
        """Eval mode and no gradients; with ``dropout_when_frozen``, no gradients but dropout on (TCT's teacher)."""
        super().freeze()
        if self.config["dropout_when_frozen"]:
            self.train()
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """As :meth:`Scorer.save_pretrained`, without ``dropout_when_frozen``: it belongs to the teacher role (its
        config option), not to the weights, so a saved folder always scores deterministically when frozen."""
        dropout = self.config.pop("dropout_when_frozen")
        try:
            return super().save_pretrained(path)
        finally:
            self.config["dropout_when_frozen"] = dropout

    def preparer(self) -> ColBERTPreparer:
        """Tokenisation of a batch (CPU, dataloader workers): the queries and each distinct document once."""
        return ColBERTPreparer(self.query_formatter, self.doc_formatter)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 scores: the full query × distinct-document MaxSim matrix, gathered at the candidates."""
        inputs = to_device(inputs, self.device)
        side_inputs = {
            s: {k[len(s) + 1 :]: v for k, v in inputs.items() if k.startswith(s + "_")} for s in ("query", "doc")
        }
        query = self.encode(side_inputs["query"], "query")
        return self.score_reps(query, self.encode(side_inputs["doc"], "doc"), inputs["candidates"])

    def query_reps(self, queries: Sequence[str], query_keys: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """Query token embeddings ``[B, Lq, dim]`` and their MaxSim mask."""
        return self.encode(to_device(self.query_formatter(queries), self.device), "query")

    def score_reps(self, queries: tuple[Tensor, ...], docs: tuple[Tensor, ...], candidates: Tensor) -> Tensor:
        """MaxSim of ``(q, q_mask)`` against ``(d [D, Ld, dim], d_mask)``, gathered at ``candidates``."""
        (q, q_mask), (d, d_mask) = queries, docs
        scores = maxsim(  # in the embeddings' dtype, fp32 scores out
            q,
            q_mask,
            d,
            d_mask,
            self.config["similarity"],
            masked_doc_tokens=self.config["masked_doc_tokens"],
        )
        return scores.gather(1, candidates.to(scores.device))

    def _save(self, path: Path) -> None:
        self.bert.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.linear.state_dict().items()}, path / LINEAR_NAME)
