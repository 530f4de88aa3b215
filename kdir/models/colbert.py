"""ColBERT late-interaction teacher (Khattab & Zaharia 2020).

Each token is embedded by BERT → a linear map to ``dim`` (no bias) → L2 normalisation. Queries are
``[CLS] [unused0] q [SEP]`` padded with ``[MASK]`` to ``query_max_length`` (query augmentation: the
``[MASK]`` tokens are attended to and take part in MaxSim); documents are ``[CLS] [unused1] d [SEP]``
truncated to ``doc_max_length``, with padding and punctuation (ColBERT's ``skiplist``) left out of MaxSim.
``score(q, d) = Σ_i max_j sim(q_i, d_j)`` with ``sim`` the cosine or the negative squared L2 distance.

Loads kdir folders (HF backbone + ``colbert_linear.safetensors``) and the layout of published checkpoints
(e.g. ``colbert-ir/colbertv2.0``: one weights file with ``bert.*`` and ``linear.weight``).
"""

from __future__ import annotations

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
from kdir.models.hf import backbone_from_config, fast_tokenizer, load_backbone

Side = Literal["query", "doc"]
Similarity = Literal["cosine", "l2"]
LINEAR_NAME = "colbert_linear.safetensors"


def maxsim(
    q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor, similarity: Similarity = "cosine", chunk_size: int = 0
) -> Tensor:
    """Late-interaction scores ``[Nq, Nd]``: ``Σ_i max_j sim(q_i, d_j)`` over unmasked tokens.

    Args:
        q / d: token embeddings ``[Nq, Lq, dim]`` / ``[Nd, Ld, dim]``.
        q_mask / d_mask: ``[Nq, Lq]`` / ``[Nd, Ld]`` bool, ``True`` where a token takes part.
        similarity: ``cosine`` (inner product; embeddings are expected unit-norm) or ``l2`` (``-‖q_i - d_j‖²``).
        chunk_size: documents per chunk (0: sized so each ``[Nq, chunk, Lq, Ld]`` block has ≤ 2^25 entries).
    """
    if similarity not in ("cosine", "l2"):
        raise ConfigError(f"similarity must be 'cosine' or 'l2', got {similarity!r}")
    n_q, l_q, _ = q.shape
    n_d, l_d, _ = d.shape
    chunk_size = chunk_size or max(1, 2**25 // max(1, n_q * l_q * l_d))
    q_mask = q_mask.to(q.dtype)
    out = []
    for s in range(0, n_d, chunk_size):
        dc, mc = d[s : s + chunk_size], d_mask[s : s + chunk_size].bool()
        sim = torch.einsum("qid,njd->qnij", q, dc)  # [Nq, n, Lq, Ld]
        if similarity == "l2":
            sim = 2 * sim - q.pow(2).sum(-1)[:, None, :, None] - dc.pow(2).sum(-1)[None, :, None, :]
        best = sim.masked_fill(~mc[None, :, None, :], float("-inf")).max(-1).values  # [Nq, n, Lq]
        best = best.masked_fill(~mc.any(-1)[None, :, None], 0.0)  # a document without tokens scores 0
        out.append((best * q_mask[:, None, :]).sum(-1))
    return torch.cat(out, dim=1) if out else q.new_zeros(n_q, 0)


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

    ``[CLS] marker text [SEP]``; queries are ``[MASK]``-padded to exactly ``max_length`` (attended unless
    ``attend_to_mask_tokens=False``), documents truncated to ``max_length`` and padded to the batch's longest.
    """

    def __init__(self, tokenizer, side: Side, marker_id: int, max_length: int, attend_to_mask_tokens: bool = True):
        self.tokenizer, self.side, self.marker_id, self.max_length = tokenizer, side, marker_id, max_length
        self.attend_to_mask_tokens = attend_to_mask_tokens

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        is_query = self.side == "query"
        enc = self.tokenizer(
            list(texts),
            max_length=self.max_length - 1,
            truncation=True,
            return_tensors="pt",
            padding="max_length" if is_query else True,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        marker = torch.full_like(ids[:, :1], self.marker_id)
        ids = torch.cat([ids[:, :1], marker, ids[:, 1:]], 1)
        mask = torch.cat([mask[:, :1], mask[:, :1], mask[:, 1:]], 1)
        if is_query:  # query augmentation: padding becomes [MASK]
            ids = ids.masked_fill(mask == 0, self.tokenizer.mask_token_id)
            if self.attend_to_mask_tokens:
                mask = torch.ones_like(mask)
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
    """A ColBERT teacher: token embeddings and MaxSim.

    Args:
        model_name_or_path: a kdir ColBERT folder, a published ColBERT checkpoint (``bert.*`` + ``linear.weight``),
            or a plain encoder (the linear map is then newly initialised).
        dim: token embedding size of a new linear map (a saved one, kdir or published, decides it, and its bias).
        similarity: ``cosine`` or ``l2``.
        query_max_length: queries are truncated or ``[MASK]``-padded to exactly this many tokens.
        doc_max_length: documents are truncated to this many tokens.
        mask_punctuation: leave document tokens that are single punctuation characters out of MaxSim.
        attend_to_mask_tokens: let the encoder attend to the query's ``[MASK]`` padding (ColBERTv2's reference
            code defaults to ``False``: they are then embedded but not attended to).
        query_marker / doc_marker: the tokens inserted after ``[CLS]``.
        normalize_queries: L2-normalise query token embeddings (ColBERT); TCT-ColBERT's teacher leaves them
            unnormalised (documents are always normalised).
        bias: a bias in the linear map (TCT-ColBERT's teacher has one; ColBERT has none).
    """

    name = "colbert"
    multi_vector = True  # a student of this kind is evaluated by MaxSim, not single-vector FAISS search

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
    ):
        super().__init__()
        if similarity not in ("cosine", "l2"):
            raise ConfigError(f"similarity must be 'cosine' or 'l2', got {similarity!r}")
        path = Path(str(model_name_or_path))
        self.tokenizer = fast_tokenizer(model_name_or_path)
        vocab = self.tokenizer.get_vocab()
        for token in (query_marker, doc_marker, self.tokenizer.mask_token):
            if token not in vocab:
                raise ConfigError(f"{model_name_or_path}: the tokenizer has no {token!r} token")
        self.marker_ids = {"query": vocab[query_marker], "doc": vocab[doc_marker]}
        skip = sorted({vocab[p] for p in string.punctuation if p in vocab}) if mask_punctuation else []
        self.register_buffer("skip_ids", torch.tensor(skip, dtype=torch.long), persistent=False)

        state = None if (path / LINEAR_NAME).is_file() else _published_state(model_name_or_path)
        if state is not None:  # published layout: one file with bert.* and linear.weight
            self.bert = backbone_from_config(model_name_or_path)
            bert = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
            missing, unexpected = self.bert.load_state_dict(bert, strict=False)
            unexpected = [k for k in unexpected if not k.startswith("pooler.") and not k.endswith("position_ids")]
            if missing or unexpected:
                raise ConfigError(
                    f"{model_name_or_path}: ColBERT weights do not fit the backbone "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            dim = state["linear.weight"].shape[0]
        else:
            self.bert = load_backbone(model_name_or_path)
        saved = load_file(path / LINEAR_NAME) if state is None and (path / LINEAR_NAME).is_file() else None
        if saved is not None:  # a kdir folder: its linear map decides the size and the bias
            dim, bias = saved["weight"].shape[0], "bias" in saved
        self.linear = nn.Linear(self.bert.config.hidden_size, dim, bias=bias)
        if state is not None:
            self.linear.weight.data.copy_(state["linear.weight"])
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
        )
        self.query_formatter = ColBERTFormatter(
            self.tokenizer, "query", self.marker_ids["query"], query_max_length, attend_to_mask_tokens
        )
        self.doc_formatter = ColBERTFormatter(self.tokenizer, "doc", self.marker_ids["doc"], doc_max_length)

    def tokenize(self, texts: Sequence[str], side: Side) -> dict[str, Tensor]:
        """``[CLS] marker text [SEP]``; queries ``[MASK]``-padded to ``query_max_length``, documents truncated."""
        return self.formatter(side)(texts)

    def formatter(self, side: Side) -> ColBERTFormatter:
        return self.query_formatter if side == "query" else self.doc_formatter

    def encode(self, inputs: dict[str, Tensor], side: Side) -> tuple[Tensor, Tensor]:
        """Token embeddings ``[N, L, dim]`` and the MaxSim mask ``[N, L]`` (bool) of one side.

        Embeddings are unit-norm, except query tokens with ``normalize_queries=False``.
        """
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        emb = self.linear(self.bert(input_ids=ids, attention_mask=attention).last_hidden_state)
        if side == "doc" or self.config["normalize_queries"]:
            emb = nn.functional.normalize(emb, dim=-1)
        if side == "query":  # every query position takes part, [MASK] padding included
            return emb, torch.ones_like(ids, dtype=torch.bool)
        return emb, attention.bool() & ~torch.isin(ids, self.skip_ids)

    def preparer(self) -> ColBERTPreparer:
        """Tokenisation of a batch (CPU, dataloader workers): the queries and each distinct document once."""
        return ColBERTPreparer(self.query_formatter, self.doc_formatter)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 scores: the full query × distinct-document MaxSim matrix, gathered at the candidates."""
        inputs = to_device(inputs, self.device)
        side_inputs = {
            s: {k[len(s) + 1 :]: v for k, v in inputs.items() if k.startswith(s + "_")} for s in ("query", "doc")
        }
        q, q_mask = self.encode(side_inputs["query"], "query")
        d, d_mask = self.encode(side_inputs["doc"], "doc")
        scores = maxsim(q.float(), q_mask, d.float(), d_mask, self.config["similarity"])
        return scores.gather(1, inputs["candidates"])

    def _save(self, path: Path) -> None:
        self.bert.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.linear.state_dict().items()}, path / LINEAR_NAME)
