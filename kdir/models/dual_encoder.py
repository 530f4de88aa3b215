"""Dual encoder (bi-encoder) over any Hugging Face encoder.

``score(q, d) = <f_q(q), f_d(d)>`` where ``f`` = backbone → pooling (``cls`` / ``mean``, optionally
skipping leading marker tokens) → optional linear projection → optional L2 normalisation
(``similarity="cosine"``). Towers are shared (BERT-dot, Hofstätter et al. 2020) or separate.

Checkpoints are Hugging Face folders: the query tower and tokenizer at the top level (so
``AutoModel.from_pretrained(path)`` works anywhere), the document tower in ``doc/`` when it is
separate, and ``kdir_model.json`` (+ ``projection.safetensors``) for the rest. As a teacher it scores the
batch's full query × document matrix, gathered at the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdir.errors import ConfigError
from kdir.models.base import Scorer, to_device
from kdir.models.hf import fast_tokenizer, load_backbone

Side = Literal["query", "doc"]


class TextFormatter:
    """Turns raw texts of one side into model inputs: optional text prefix, truncation, padding.

    With ``mask_padding`` (TCT-ColBERT's queries, pyserini's ``"[CLS] [Q] " + q + "[MASK]" * 36``), every text
    is exactly ``max_length`` tokens: the final ``[SEP]`` and the padding become attended ``[MASK]`` tokens.
    Light and picklable, so dataloader workers carry it instead of the model.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, prefix: str = "", mask_padding: bool = False
    ):
        if mask_padding and tokenizer.mask_token_id is None:
            raise ConfigError("mask_padding needs a tokenizer with a [MASK] token")
        self.tokenizer, self.max_length, self.prefix, self.mask_padding = tokenizer, max_length, prefix, mask_padding

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if self.prefix:
            texts = [self.prefix + t for t in texts]
        enc = self.tokenizer(
            list(texts),
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
            padding="max_length" if self.mask_padding else True,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if self.mask_padding:
            filler = (mask == 0) | (ids == self.tokenizer.sep_token_id)
            ids, mask = ids.masked_fill(filler, self.tokenizer.mask_token_id), torch.ones_like(mask)
        return {"input_ids": ids, "attention_mask": mask}


class DualPreparer:
    """A dual encoder's batch tokenisation: each query and each distinct document once (picklable, no weights)."""

    def __init__(self, query_formatter: TextFormatter, doc_formatter: TextFormatter):
        self.query_formatter, self.doc_formatter = query_formatter, doc_formatter

    def __call__(self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor) -> dict:
        """``{"query", "doc", "candidates"}``: ``candidates [B, C]`` index the batch's distinct ``docs``."""
        return {
            "query": self.query_formatter(queries),
            "doc": self.doc_formatter(docs),
            "candidates": torch.as_tensor(np.asarray(candidates), dtype=torch.long),
        }


class DualEncoder(Scorer):
    """A bi-encoder student (or teacher) over Hugging Face backbones.

    Args:
        model_name_or_path: hub name or local folder of the (query) backbone, or a kdir checkpoint.
        pooling: ``cls`` (first token) or ``mean`` (over non-padding tokens).
        skip_tokens: leading tokens left out of mean pooling (e.g. 4 for TCT-ColBERT's ``[CLS] [ q ]``).
        shared: one backbone for queries and documents (the default) or two towers.
        doc_model_name_or_path: document backbone when ``shared=False`` (defaults to the query one).
        projection_dim: add a linear map to this size after pooling (``None``: no projection).
        similarity: ``dot`` (raw inner product) or ``cosine`` (L2-normalised embeddings, inner product).
        query_max_length / doc_max_length: truncation lengths in tokens.
        query_prefix / doc_prefix: text markers prepended before tokenisation (e.g. ``"[Q] "``).
        query_mask_padding: pad queries with attended ``[MASK]`` tokens to ``query_max_length`` (TCT-ColBERT).
        freeze_doc_encoder: keep the document tower (and its tokenizer) exactly as loaded: no gradients, always
            in eval mode (EmbedDistill's asymmetric student inherits the teacher's document tower); the query
            tower is then projected to the document tower's size when the two differ.
        tokenizer_name_or_path: tokenizer source if not the model folder.
    """

    name = "dual_encoder"
    non_scoring = ("freeze_doc_encoder",)  # a training setting: a frozen teacher scores the same either way

    def __init__(
        self,
        model_name_or_path: str | Path,
        pooling: Literal["cls", "mean"] = "mean",
        skip_tokens: int = 0,
        shared: bool = True,
        doc_model_name_or_path: str | Path | None = None,
        projection_dim: int | None = None,
        similarity: Literal["dot", "cosine"] = "dot",
        query_max_length: int = 32,
        doc_max_length: int = 256,
        query_prefix: str = "",
        doc_prefix: str = "",
        query_mask_padding: bool = False,
        freeze_doc_encoder: bool = False,
        tokenizer_name_or_path: str | Path | None = None,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if similarity not in ("dot", "cosine"):
            raise ConfigError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        path = Path(str(model_name_or_path))
        doc_path = doc_model_name_or_path
        if doc_path is None and not shared and (path / "doc").is_dir():
            doc_path = path / "doc"
        self.config = dict(
            pooling=pooling,
            skip_tokens=skip_tokens,
            shared=shared,
            projection_dim=projection_dim,
            similarity=similarity,
            query_max_length=query_max_length,
            doc_max_length=doc_max_length,
            query_prefix=query_prefix,
            doc_prefix=doc_prefix,
            query_mask_padding=query_mask_padding,
            freeze_doc_encoder=freeze_doc_encoder,
        )
        if freeze_doc_encoder and shared:
            raise ConfigError("freeze_doc_encoder needs separate towers (shared=false)")
        self.query_encoder = load_backbone(model_name_or_path)
        self.doc_encoder = self.query_encoder if shared else load_backbone(doc_path or model_name_or_path)
        self.tokenizer = fast_tokenizer(tokenizer_name_or_path or model_name_or_path)
        doc_tokenizer = self.tokenizer
        if freeze_doc_encoder and doc_path is not None:  # the inherited tower keeps its own vocabulary
            doc_tokenizer = fast_tokenizer(doc_path)
        hidden, doc_hidden = self.query_encoder.config.hidden_size, self.doc_encoder.config.hidden_size
        if freeze_doc_encoder:  # only the query side is projected, onto the frozen tower's space
            out = doc_hidden if projection_dim is None else projection_dim
            if projection_dim is not None and projection_dim != doc_hidden:
                raise ConfigError(
                    f"projection_dim={projection_dim} must equal the frozen document tower's size {doc_hidden}"
                )
            self.query_projection = nn.Linear(hidden, out) if out != hidden or projection_dim else None
            self.doc_projection = None
            self.config["projection_dim"] = out if self.query_projection is not None else None
        else:
            self.query_projection = nn.Linear(hidden, projection_dim) if projection_dim else None
            self.doc_projection = (
                self.query_projection if shared or not projection_dim else nn.Linear(doc_hidden, projection_dim)
            )
        if self.query_projection is not None and (path / "projection.safetensors").is_file():
            self._load_projection(path / "projection.safetensors")
        self.query_formatter = TextFormatter(self.tokenizer, query_max_length, query_prefix, query_mask_padding)
        self.doc_formatter = TextFormatter(doc_tokenizer, doc_max_length, doc_prefix)
        if freeze_doc_encoder:
            self.doc_encoder.requires_grad_(False)
            self.doc_encoder.eval()

    def train(self, mode: bool = True) -> DualEncoder:
        """As ``nn.Module.train``, but a frozen document tower stays in eval mode (no dropout)."""
        super().train(mode)
        if self.config.get("freeze_doc_encoder"):
            self.doc_encoder.eval()
        return self

    @property
    def dim(self) -> int:
        return self.config["projection_dim"] or self.query_encoder.config.hidden_size

    def formatter(self, side: Side) -> TextFormatter:
        return self.query_formatter if side == "query" else self.doc_formatter

    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Pool token states ``[N, L, H]`` with attention mask ``[N, L]`` into ``[N, H]``."""
        if self.config["pooling"] == "cls":
            return hidden[:, 0]
        mask = mask.to(hidden.dtype)
        if self.config["skip_tokens"]:
            mask = mask.clone()
            mask[:, : self.config["skip_tokens"]] = 0
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    def encode(self, tokens: dict[str, Tensor], side: Side) -> Tensor:
        """Embed tokenised texts of one side: ``[N, dim]``."""
        encoder = self.query_encoder if side == "query" else self.doc_encoder
        hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        emb = self.pool(hidden, tokens["attention_mask"])
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
        return self.score_matrix(q, d).float().gather(1, inputs["candidates"].to(q.device))  # [B, C]

    def outputs(self, inputs: dict, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``[B, C]``, query embeddings ``[B, dim]`` and each query's ``positive``-column document's
        embedding ``[B, dim]`` (rows with ``positive < 0`` take column 0: undefined for embedding matching)."""
        q, d = self.embed(inputs)
        cand = inputs["candidates"].to(q.device)
        own = cand.gather(1, positive.clamp(min=0).to(cand.device)[:, None])[:, 0]
        return self.score_matrix(q, d).float().gather(1, cand), q, d[own]

    def _save(self, path: Path) -> None:
        """The query tower + tokenizer at the top level (``AutoModel.from_pretrained`` works), the document tower in
        ``doc/`` when separate, the projections in ``projection.safetensors``."""
        self.query_encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if not self.config["shared"]:
            self.doc_encoder.save_pretrained(path / "doc")
            self.doc_formatter.tokenizer.save_pretrained(path / "doc")
        if self.query_projection is not None:
            tensors = {f"query.{k}": v for k, v in self.query_projection.state_dict().items()}
            if self.doc_projection is not None:
                tensors |= {f"doc.{k}": v for k, v in self.doc_projection.state_dict().items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, path / "projection.safetensors")

    def _load_projection(self, file: Path) -> None:
        tensors = load_file(file)
        self.query_projection.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("query.")})
        if self.doc_projection is not None:
            self.doc_projection.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("doc.")})
