"""Sentence-transformers modules for the dual-encoder settings sentence-transformers cannot express natively.

* :class:`KdirTransformer`: TCT-ColBERT's token layouts (Lin et al. 2021; castorini/tct_colbert
  ``tokenization.py: convert_to_colbert_input``, castorini/pyserini ``_tct_colbert.py``): texts as ``[CLS]`` + their
  tokens with no final ``[SEP]`` (``add_sep=False``), and queries of exactly ``query_mask_length`` tokens whose padding
  (and final ``[SEP]``, if any) are attended ``[MASK]`` tokens. sentence-transformers' own ``query_expansion`` keeps
  the ``[SEP]``.
* :class:`SkipTokensPooling`: mean pooling that leaves out a fixed number of leading positions (TCT-ColBERT's
  ``[CLS] [ q ]``), whatever the prompt.

This file is self-contained (torch and sentence-transformers >= 6 only, no kdir import): the export
(:func:`kdir.models.st_format.export_sentence_transformers`) copies it into the model folder as
``kdir_st_modules.py``, and ``SentenceTransformer(folder, trust_remote_code=True)`` loads it from there, as it does any
repository-local module (https://sbert.net/docs/sentence_transformer/usage/custom_models.html), with or without kdir.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.modules import Transformer
from sentence_transformers.sentence_transformer.modules import Pooling


class KdirTransformer(Transformer):
    """A sentence-transformers ``Transformer`` with TCT-ColBERT's token layouts.

    With ``add_sep=False`` every text is ``[CLS]`` + its first ``length - 1`` tokens, no final ``[SEP]`` (``length``:
    the task's ``query_length`` / ``document_length``, else ``max_seq_length``): pyserini's ``"[CLS] [D] " + d``
    tokenised with ``add_special_tokens=False``. With ``query_mask_length``, query batches (``task="query"``) are
    right-padded to exactly that many tokens (``query_length`` must be at most that), and the padding and the final
    ``[SEP]`` become attended ``[MASK]`` tokens: ``"[CLS] [Q] " + q + "[MASK]" * 36`` tokenised without special
    tokens to 36 positions. Documents are never mask-padded.

    Args:
        model_name_or_path: the backbone folder or hub name (as for ``Transformer``).
        query_mask_length: the fixed query length in tokens (``None``: no mask padding).
        add_sep: end texts with the tokenizer's ``[SEP]`` (``Transformer``'s layout) or not.
        **kwargs: ``Transformer``'s own arguments.
    """

    config_keys: list[str] = [*Transformer.config_keys, "query_mask_length", "add_sep"]

    def __init__(
        self, model_name_or_path: str, *, query_mask_length: int | None = None, add_sep: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.query_mask_length, self.add_sep = query_mask_length, add_sep
        if query_mask_length and (self.tokenizer is None or self.tokenizer.mask_token_id is None):
            raise ValueError("KdirTransformer needs a tokenizer with a [MASK] token for query_mask_length")
        if not add_sep and (self.tokenizer is None or self.tokenizer.cls_token_id is None):
            raise ValueError("KdirTransformer needs a tokenizer with a [CLS] token for add_sep=False")

    def _should_flatten_inputs(self, modality: Any, processor_inputs: dict[str, Any], **kwargs: Any) -> bool:
        if not self.add_sep or (kwargs.get("task") == "query" and self.query_mask_length):
            return False  # unpadded (flash-attention) batches: no column to prepend [CLS] to, no positions to mask
        return super()._should_flatten_inputs(modality, processor_inputs, **kwargs)

    def preprocess(self, inputs: Any, prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        if self.add_sep:
            features = super().preprocess(inputs, prompt=prompt, **kwargs)
        else:
            features = self._without_sep(inputs, prompt, **kwargs)
        if kwargs.get("task") != "query" or not self.query_mask_length or "input_ids" not in features:
            return features
        tok, length = self.tokenizer, self.query_mask_length
        ids, mask = features["input_ids"], features["attention_mask"]
        if ids.shape[1] > length:
            raise ValueError(f"query batch of {ids.shape[1]} tokens: set query_length <= {length}")
        pad = length - ids.shape[1]
        ids = F.pad(ids, (0, pad), value=tok.pad_token_id or 0)
        mask = F.pad(mask, (0, pad), value=0)
        if "token_type_ids" in features:
            features["token_type_ids"] = F.pad(features["token_type_ids"], (0, pad), value=0)
        filler = mask == 0
        if self.add_sep and tok.sep_token_id is not None:
            filler |= ids == tok.sep_token_id
        features["input_ids"] = ids.masked_fill(filler, tok.mask_token_id)
        features["attention_mask"] = torch.ones_like(mask)
        return features

    def _without_sep(self, inputs: Any, prompt: str | None, **kwargs: Any) -> dict[str, Any]:
        """``[CLS]`` + the first ``length - 1`` tokens of each (prompted) text, tokenised without special tokens."""
        task = kwargs.get("task")
        lengths = {"query": self.query_length, "document": self.document_length}
        length = kwargs.get("max_length") or lengths.get(task) or self.max_seq_length
        text = {"add_special_tokens": False} | ({"max_length": length - 1} if length else {})
        per_call = dict(kwargs.pop("processing_kwargs", None) or {})
        per_call["text"] = {**(per_call.get("text") or {}), **text}
        features = super().preprocess(inputs, prompt=prompt, processing_kwargs=per_call, **kwargs)
        if "input_ids" not in features:
            return features
        ids = features["input_ids"]
        column = torch.full((ids.shape[0], 1), self.tokenizer.cls_token_id, dtype=ids.dtype, device=ids.device)
        features["input_ids"] = torch.cat([column, ids], 1)
        for key, value in (("attention_mask", 1), ("token_type_ids", 0)):
            if key in features:
                features[key] = torch.cat([torch.full_like(column, value), features[key].to(ids.dtype)], 1)
        return features


class SkipTokensPooling(Pooling):
    """Mean pooling over the positions from ``skip_tokens`` on: the first ``skip_tokens`` positions of every text
    are left out, prompt or not (padding is left out as usual).

    Args:
        embedding_dimension: the token embedding size.
        pooling_mode: ``"mean"`` (the only mode with positions to skip).
        include_prompt: as for ``Pooling`` when ``skip_tokens`` is 0; otherwise the skipped positions take the
            prompt's place (saved as ``False``).
        skip_tokens: how many leading positions to leave out.
    """

    config_keys: list[str] = [*Pooling.config_keys, "skip_tokens"]

    def __init__(
        self, embedding_dimension: int, pooling_mode: str = "mean", include_prompt: bool = True, skip_tokens: int = 0
    ) -> None:
        if pooling_mode != "mean":
            raise ValueError(f"SkipTokensPooling pools by the mean only, got pooling_mode={pooling_mode!r}")
        super().__init__(embedding_dimension, pooling_mode="mean", include_prompt=include_prompt and not skip_tokens)
        self.skip_tokens = skip_tokens

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if not self.skip_tokens:
            return super().forward(features, **kwargs)
        # Pooling without the prompt leaves out `prompt_length` leading positions (padded and unpadded batches
        # alike): the same machinery, with the fixed count in place of the prompt's length.
        pooled = super().forward({**features, "prompt_length": self.skip_tokens}, **kwargs)["sentence_embedding"]
        features["sentence_embedding"] = pooled
        return features
