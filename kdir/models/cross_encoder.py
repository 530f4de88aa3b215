"""Cross-encoder teacher: BERT-CAT (Nogueira & Cho 2019; Hofstätter et al. 2020).

``[CLS] q [SEP] d [SEP]`` → a linear head on ``[CLS]`` → one logit per pair. Only the ``B × C``
candidate pairs are run. With ``dual_pooling`` (EmbedDistill, Kim et al. 2023, §3.2) the head is replaced
by mean pooling of the final layer over the query tokens (``e_q``) and over the document tokens (``e_d``)
of the joint encoding, and the score is ``<e_q, e_d>``: a cross-encoder whose pooled embeddings a dual
encoder student can match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from kdir.errors import ConfigError
from kdir.models.base import Scorer, as_candidates, to_device
from kdir.models.hf import fast_tokenizer, load_backbone, load_sequence_classifier


@dataclass(frozen=True)
class PairLayout:
    """Where a tokenizer puts its special tokens around a pair ``(a, b)`` (its post-processor's template):
    ``prefix + a + middle + b + suffix``, with the token types of each part (BERT: ``[CLS] a [SEP] b [SEP]``,
    types ``0 … 0 1 … 1``; RoBERTa: ``<s> a </s></s> b </s>``)."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    a_type: int
    b_type: int

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def ids(self, a: list[int], b: list[int]) -> list[int]:
        return [*self.prefix, *a, *self.middle, *b, *self.suffix]

    def types(self, a: int, b: int) -> list[int]:
        """Token types of a pair of ``a`` and ``b`` tokens."""
        return [*self.prefix_types, *[self.a_type] * a, *self.middle_types, *[self.b_type] * b, *self.suffix_types]

    def special(self, a: int, b: int) -> list[int]:
        """The special-tokens mask of a pair of ``a`` and ``b`` tokens (1: a token of the template)."""
        return [1] * len(self.prefix) + [0] * a + [1] * len(self.middle) + [0] * b + [1] * len(self.suffix)


def pair_layout(tokenizer) -> PairLayout | None:
    """The tokenizer's :class:`PairLayout`, read off its own encodings of two probe pairs; ``None`` when they do not
    fit one (then pairs are left to the tokenizer)."""

    def encode(*texts: str, **kw) -> dict:
        return tokenizer(*texts, return_token_type_ids=True, return_special_tokens_mask=True, **kw)

    try:
        a, b = (encode(t, add_special_tokens=False)["input_ids"] for t in ("alpha", "beta"))
        pair = encode("alpha", "beta")
        ids, types = pair["input_ids"], pair["token_type_ids"]
    except (KeyError, TypeError, ValueError):  # a tokenizer without pairs or token types: leave pairs to it
        return None
    i = next((k for k in range(len(ids)) if ids[k : k + len(a)] == a), None)
    j = next((k for k in range(i + len(a), len(ids)) if ids[k : k + len(b)] == b), None) if i is not None else None
    if not a or not b or j is None:
        return None
    ia, ja = i + len(a), j + len(b)
    layout = PairLayout(
        tuple(ids[:i]), tuple(ids[ia:j]), tuple(ids[ja:]), tuple(types[:i]), tuple(types[ia:j]), tuple(types[ja:]),
        types[i], types[j],
    )  # fmt: skip
    for q, d in (("alpha", "beta"), ("gamma delta, epsilon", "zeta")):  # the layout must give the tokenizer's own
        qa, db = (encode(t, add_special_tokens=False)["input_ids"] for t in (q, d))
        want = encode(q, d)
        got = layout.ids(qa, db), layout.types(len(qa), len(db)), layout.special(len(qa), len(db))
        if got != (want["input_ids"], want["token_type_ids"], want["special_tokens_mask"]):
            return None
    return layout


class PairPreparer:
    """A cross-encoder's batch tokenisation: ``[CLS] q [SEP] d [SEP]`` for every candidate pair (picklable).

    Each distinct query and each document is tokenised once, and the ``B × C`` pairs are assembled from their token
    ids with the tokenizer's own template (:func:`pair_layout`): the same ``input_ids`` / ``token_type_ids`` /
    ``attention_mask`` (/ ``special_tokens_mask``) as the tokenizer's pair encoding ``tokenizer(q, d,
    truncation="only_second", max_length=max_length, padding=True)`` of the query cut after its
    ``query_max_length``-th token, without tokenising a query once per candidate and a document once per query.
    """

    def __init__(self, tokenizer, use_token_types: bool, **settings) -> None:
        self.tokenizer, self.use_token_types, self.settings = tokenizer, use_token_types, settings
        self.layout = pair_layout(tokenizer)

    def _cut(self, queries: Sequence[str]) -> tuple[list[list[int]], list[str]]:
        """Each query's token ids up to its ``query_max_length``-th token, and its text cut after that token."""
        enc = self.tokenizer(
            list(queries),
            add_special_tokens=False,
            truncation=True,
            max_length=self.settings["query_max_length"],
            return_offsets_mapping=True,
        )
        texts = [q[: offsets[-1][1]] if offsets else q for q, offsets in zip(queries, enc["offset_mapping"])]
        return enc["input_ids"], texts

    def _truncate_queries(self, queries: Sequence[str]) -> list[str]:
        """Cut each query text after its ``query_max_length``-th token."""
        return self._cut(queries)[1]

    def _query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """The token ids of each query as its pair encoding has them: those of the text cut after its
        ``query_max_length``-th token (a cut text is tokenised again, which some tokenizers split otherwise)."""
        ids, cut = self._cut(queries)
        limit = self.settings["query_max_length"]
        again = [i for i, (q, text) in enumerate(zip(queries, cut)) if text != q or len(ids[i]) == limit]
        if again:
            for i, row in zip(again, self.tokenizer([cut[i] for i in again], add_special_tokens=False)["input_ids"]):
                ids[i] = row
        return ids

    def __call__(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor
    ) -> dict[str, Tensor]:
        """Tokenise the ``B × C`` pairs ``[CLS] q [SEP] d [SEP]`` (row ``i * C + j``: query ``i``, candidate ``j``)."""
        cand = as_candidates(candidates, len(queries), len(docs))
        if self.layout is None:
            return self._pair_encoding(queries, docs, cand)
        layout, max_length = self.layout, self.settings["max_length"]
        distinct = list(dict.fromkeys(queries))
        q_ids = dict(zip(distinct, self._query_ids(distinct)))
        d_ids = self.tokenizer(
            list(docs), add_special_tokens=False, truncation=True, max_length=max_length - layout.n_special
        )["input_ids"]
        ids, sizes = [], []
        for q, row in zip(queries, cand.tolist()):
            a = q_ids[q]
            budget = max(0, max_length - layout.n_special - len(a))  # only_second: the document gives way
            for j in row:
                b = d_ids[j][:budget]
                ids.append(layout.ids(a, b))
                sizes.append((len(a), len(b)))
        out = {"input_ids": self._pad(ids, self.tokenizer.pad_token_id)}
        if self.use_token_types:
            out["token_type_ids"] = self._pad([layout.types(*n) for n in sizes], self.tokenizer.pad_token_type_id)
        out["attention_mask"] = self._pad([[1] * len(r) for r in ids], 0)
        if self.settings["dual_pooling"]:
            out["special_tokens_mask"] = self._pad([layout.special(*n) for n in sizes], 1)
        return out | {"candidates": cand}

    def _pad(self, rows: list[list[int]], value: int) -> Tensor:
        """``[N, longest]`` int64 of ``rows`` padded with ``value`` on the tokenizer's padding side."""
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if len(rows) else 0
        out = np.full((len(rows), width), value, dtype=np.int64)
        filled = np.arange(width)[None, :] < lengths[:, None]
        if self.tokenizer.padding_side == "left":
            filled = filled[:, ::-1]
        out[filled] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(out)

    def _pair_encoding(self, queries: Sequence[str], docs: Sequence[str], cand: Tensor) -> dict[str, Tensor]:
        """The tokenizer's own pair encoding of every pair (tokenizers whose template :func:`pair_layout` cannot
        read)."""
        n_cand = cand.shape[1]
        q_texts = [q for q in self._truncate_queries(queries) for _ in range(n_cand)]
        d_texts = [docs[j] for j in cand.reshape(-1).tolist()]
        enc = self.tokenizer(
            q_texts,
            d_texts,
            truncation="only_second",
            max_length=self.settings["max_length"],
            padding=True,
            return_tensors="pt",
            return_token_type_ids=self.use_token_types,
            return_special_tokens_mask=self.settings["dual_pooling"],
        )
        return dict(enc) | {"candidates": cand}


class CrossEncoder(Scorer):
    """A BERT-CAT cross-encoder teacher.

    Args:
        model_name_or_path: a sequence-classification checkpoint (``num_labels=1``), or a plain encoder (the
            head is then newly initialised), or a kdir teacher folder.
        query_max_length: queries are cut to this many tokens before pairing.
        max_length: length of the pair in tokens; only the document is truncated (``only_second``).
        dual_pooling: score ``<mean(query tokens), mean(document tokens)>`` instead of the ``[CLS]`` head.
        attn_implementation: the backbone's attention kernel, ``sdpa`` or ``eager`` (``None``: transformers'
            default; :mod:`kdir.models.hf`). Speed only: not saved, not part of the provenance.
    """

    name = "cross_encoder"

    def __init__(
        self,
        model_name_or_path: str | Path,
        query_max_length: int = 64,
        max_length: int = 512,
        dual_pooling: bool = False,
        attn_implementation: Literal["sdpa", "eager"] | None = None,
    ):
        super().__init__()
        if max_length < query_max_length + 4:
            raise ConfigError(
                f"max_length={max_length} leaves no room for the document "
                f"(query_max_length={query_max_length} + 3 special tokens)"
            )
        self.config = dict(query_max_length=query_max_length, max_length=max_length, dual_pooling=dual_pooling)
        self.tokenizer = fast_tokenizer(model_name_or_path)
        self.use_token_types = "token_type_ids" in self.tokenizer.model_input_names
        if dual_pooling and not self.use_token_types:
            raise ConfigError(
                f"{model_name_or_path}: dual pooling finds the query by token_type_ids, which this "
                "tokenizer does not produce"
            )
        self._preparer: PairPreparer | None = None
        self.model = (
            load_backbone(model_name_or_path, attn_implementation)
            if dual_pooling
            else load_sequence_classifier(model_name_or_path, attn_implementation=attn_implementation)
        )

    @property
    def embeds(self) -> bool:
        return bool(self.config["dual_pooling"])

    def preparer(self) -> PairPreparer:
        """Tokenisation of the ``B × C`` candidate pairs (CPU, dataloader workers; the tokenizer and settings only),
        made once (it reads the tokenizer's pair template)."""
        if self._preparer is None:
            self._preparer = PairPreparer(self.tokenizer, self.use_token_types, **self.config)
        return self._preparer

    def _encode(self, inputs: dict[str, Tensor]):
        inputs = to_device(inputs, self.device)
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        return inputs, self.model(**model_inputs)

    def embed_pairs(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Dual pooling: mean final-layer states over query tokens ``e_q`` and document tokens ``e_d``, ``[B, C, H]``.

        Query tokens: segment A without ``[CLS]``/``[SEP]``; document tokens: segment B without the final ``[SEP]``.
        """
        if not self.config["dual_pooling"]:
            raise ValueError("embed_pairs needs a CrossEncoder built with dual_pooling=True")
        inputs, out = self._encode(inputs)
        hidden = out.last_hidden_state  # [B*C, L, H]
        content = inputs["attention_mask"].bool() & ~inputs["special_tokens_mask"].bool()
        segment_b = inputs["token_type_ids"].bool()
        pooled = []
        for mask in (content & ~segment_b, content & segment_b):
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))
        shape = (*inputs["candidates"].shape, hidden.shape[-1])
        return pooled[0].view(shape), pooled[1].view(shape)

    def outputs(self, inputs: dict[str, Tensor], positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Dual pooling: scores ``[B, C]`` and the pair embeddings ``e_q``, ``e_d`` ``[B, H]`` of each query with its
        ``positive``-column document (EmbedDistill's CE→DE matching on training pairs); a row without a positive
        (``-1``: a generated query) takes its highest-scored candidate as the pair."""
        e_q, e_d = self.embed_pairs(inputs)
        scores = (e_q.float() * e_d.float()).sum(-1)
        positive = positive.to(scores.device)
        col = torch.where(positive >= 0, positive, scores.argmax(dim=1))
        rows = torch.arange(len(col), device=col.device)
        return scores, e_q[rows, col], e_d[rows, col]

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 scores: the head's logit, or ``<e_q, e_d>`` with dual pooling."""
        if self.config["dual_pooling"]:
            e_q, e_d = self.embed_pairs(inputs)
            return (e_q.float() * e_d.float()).sum(-1)
        inputs, out = self._encode(inputs)
        return out.logits.float().view(inputs["candidates"].shape)

    def _save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
