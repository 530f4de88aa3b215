"""One encode loop for every encoder: single-vector (dual encoders) and multi-vector (ColBERT) alike.

:func:`encode_batch` turns one tokenised batch of one side into the tensors retrieval needs: ``(embeddings,)``
fp32 ``[N, dim]`` for single-vector models, ``(embeddings, mask)`` fp16 ``[N, L, dim]`` + bool ``[N, L]`` padded
to the side's maximum length for multi-vector ones (so batches and ranks concatenate). :func:`encode_texts` runs
it over many texts in length-sorted batches (less padding), tokenised in DataLoader worker processes with
``num_workers > 0``; Lightning's evaluation steps call it per batch.

:func:`resolve_precision` / :func:`autocast` are the ``precision`` setting of the commands that encode or score
outside Lightning's trainer (``kdir.evaluate``, ``kdir.mine``, ``kdir.score``, ``kdir.encode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from kdir.errors import ConfigError
from kdir.models.base import Scorer, to_device

Side = Literal["query", "doc"]
PRECISIONS = ("auto", "bf16-mixed", "32-true")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """A command's ``precision`` on ``device``: ``auto`` is ``bf16-mixed`` on CUDA and ``32-true`` elsewhere;
    ``bf16-mixed`` (``torch.autocast`` to bfloat16, on CPUs too) and ``32-true`` are taken as they are."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r}: expected auto (bf16-mixed on CUDA, else 32-true), bf16-mixed or 32-true"
        )
    if precision == "auto":
        return "bf16-mixed" if _device_type(device) == "cuda" else "32-true"
    return precision


def _device_type(device: str | torch.device) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def autocast(precision: str, device: str | torch.device) -> torch.autocast:
    """``torch.autocast`` to bfloat16 on ``device`` when ``precision`` resolves to ``bf16-mixed`` (else disabled)."""
    device_type = _device_type(device)
    enabled = resolve_precision(precision, device) == "bf16-mixed"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def accelerator_device(accelerator: str) -> str:
    """The device type Lightning Fabric's ``accelerator`` setting gives (``auto``: CUDA when there is one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator == "auto" else str(accelerator)


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
    num_workers: int = 0,
) -> tuple[Tensor, ...]:
    """Encode ``texts`` of one side in length-sorted batches, in eval mode; rows in the order of ``texts``.

    Returns :func:`encode_batch`'s tensors for all texts (token embeddings in ``token_dtype``), on ``out_device``.
    With ``num_workers > 0`` the next batches are tokenised in that many DataLoader worker processes while the model
    encodes (the workers carry the side's formatter, not the model); the results are the same.
    """
    from tqdm.auto import tqdm

    from kdir.retrieval.stream_encode import ChunkBatches

    device = device or model.device
    was_training = model.training
    model.eval()
    # one chunk of all texts, longest first (stable); the workers inherit the order computed here
    batches = ChunkBatches(texts, [(0, len(texts))], model.formatter(side), batch_size)
    order = batches.order(0)
    if num_workers:
        loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
    else:
        loader = (batches[i] for i in range(len(batches)))
    parts: list[tuple[Tensor, ...]] = []
    try:
        for _, _, tokens in tqdm(
            loader, total=len(batches), desc=f"encode {side}", disable=not progress, unit="batch"
        ):
            out = encode_batch(model, to_device(tokens, device), side, token_dtype)
            parts.append(tuple(t.to(out_device) for t in out))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("encode_texts needs at least one text")
    inverse = torch.as_tensor(np.argsort(order), device=out_device)
    # outside autocast: its cat would promote fp16 token embeddings against bf16 and refuse to
    with torch.autocast(_device_type(out_device), enabled=False):
        return tuple(torch.cat(p)[inverse] for p in zip(*parts))
