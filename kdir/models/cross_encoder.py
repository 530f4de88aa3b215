"""Cross-encoder teacher: BERT-CAT (Nogueira & Cho 2019; Hofstätter et al. 2020).

``[CLS] q [SEP] d [SEP]`` → a linear head on ``[CLS]`` → one logit per pair. Only the ``B × C``
candidate pairs are run. With ``dual_pooling`` (EmbedDistill, Kim et al. 2023, §3.2) the head is replaced
by mean pooling of the final layer over the query tokens (``e_q``) and over the document tokens (``e_d``)
of the joint encoding, and the score is ``<e_q, e_d>``: a cross-encoder whose pooled embeddings a dual
encoder student can match.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdir.errors import ConfigError
from kdir.models.base import Scorer, as_candidates, to_device
from kdir.models.hf import fast_tokenizer, load_backbone, load_sequence_classifier


class PairPreparer:
    """A cross-encoder's batch tokenisation: ``[CLS] q [SEP] d [SEP]`` for every candidate pair (picklable)."""

    def __init__(self, tokenizer, use_token_types: bool, **settings) -> None:
        self.tokenizer, self.use_token_types, self.settings = tokenizer, use_token_types, settings

    def _truncate_queries(self, queries: Sequence[str]) -> list[str]:
        """Cut each query text after its ``query_max_length``-th token."""
        enc = self.tokenizer(
            list(queries),
            add_special_tokens=False,
            truncation=True,
            max_length=self.settings["query_max_length"],
            return_offsets_mapping=True,
        )
        return [q[: offsets[-1][1]] if offsets else q for q, offsets in zip(queries, enc["offset_mapping"])]

    def __call__(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor
    ) -> dict[str, Tensor]:
        """Tokenise the ``B × C`` pairs ``[CLS] q [SEP] d [SEP]`` (row ``i * C + j``: query ``i``, candidate ``j``)."""
        cand = as_candidates(candidates, len(queries), len(docs))
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
    """

    name = "cross_encoder"

    def __init__(
        self,
        model_name_or_path: str | Path,
        query_max_length: int = 64,
        max_length: int = 512,
        dual_pooling: bool = False,
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
        self.model = (
            load_backbone(model_name_or_path) if dual_pooling else load_sequence_classifier(model_name_or_path)
        )

    @property
    def embeds(self) -> bool:
        return bool(self.config["dual_pooling"])

    def preparer(self) -> PairPreparer:
        """Tokenisation of the ``B × C`` candidate pairs (CPU, dataloader workers; the tokenizer and settings only)."""
        return PairPreparer(self.tokenizer, self.use_token_types, **self.config)

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
