"""One encode loop for every encoder: single-vector (dual encoders) and multi-vector (ColBERT) alike.

:func:`encode_batch` turns one tokenised batch of one side into the tensors retrieval needs: ``(embeddings,)``
fp32 ``[N, dim]`` for single-vector models, ``(embeddings, mask)`` fp16 ``[N, L, dim]`` + bool ``[N, L]`` padded
to the side's maximum length for multi-vector ones (so batches and ranks concatenate). :func:`encode_texts` runs
it over many texts in length-sorted batches (less padding); Lightning's evaluation steps call it per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdir.models.base import Scorer, to_device

Side = Literal["query", "doc"]


def encode_batch(
    model: Scorer, tokens: dict[str, Tensor], side: Side, token_dtype: torch.dtype = torch.float16
) -> tuple[Tensor, ...]:
    """Encodings of one tokenised batch: ``(emb fp32 [N, dim],)`` or ``(emb [N, L, dim], mask [N, L])`` with token
    embeddings in ``token_dtype`` (fp16: half the memory of a corpus' tokens)."""
    if not model.multi_vector:
        return (model.encode(tokens, side).float(),)
    emb, mask = model.encode(tokens, side)
    pad = model.config[f"{side}_max_length"] - emb.shape[1]
    return F.pad(emb.to(token_dtype), (0, 0, 0, pad)), F.pad(mask, (0, pad))


@torch.inference_mode()
def encode_texts(
    model: Scorer,
    texts: Sequence[str],
    side: Side,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
    out_device: str | torch.device = "cpu",
    token_dtype: torch.dtype = torch.float16,
) -> tuple[Tensor, ...]:
    """Encode ``texts`` of one side in length-sorted batches, in eval mode; rows in the order of ``texts``.

    Returns :func:`encode_batch`'s tensors for all texts (token embeddings in ``token_dtype``), on ``out_device``.
    """
    from tqdm.auto import tqdm

    device = device or model.device
    was_training = model.training
    model.eval()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    fmt = model.formatter(side)
    parts: list[tuple[Tensor, ...]] = []
    try:
        for s in tqdm(range(0, len(texts), batch_size), desc=f"encode {side}", disable=not progress, unit="batch"):
            idx = order[s : s + batch_size]
            out = encode_batch(model, to_device(fmt([texts[i] for i in idx]), device), side, token_dtype)
            parts.append(tuple(t.to(out_device) for t in out))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("encode_texts needs at least one text")
    inverse = torch.as_tensor(np.argsort(order), device=out_device)
    return tuple(torch.cat(p)[inverse] for p in zip(*parts))
