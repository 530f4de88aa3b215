"""What every teacher model offers: ``prepare`` (CPU tokenisation, dataloader workers) and ``forward`` (scores).

``prepare(queries, docs, candidates)`` turns ``B`` query texts, a list of document texts and ``[B, C]``
candidate indices into ``docs`` into a flat dict of CPU tensors; ``forward`` moves them to the module's
device and returns ``[B, C]`` fp32 scores (with gradients when training). Checkpoints are Hugging Face
folders plus ``kdir_teacher.json`` (the constructor settings).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

CONFIG_NAME = "kdir_teacher.json"


def to_device(inputs: dict, device: torch.device | str) -> dict:
    """Move every tensor of a (nested) dict to ``device``."""
    return move_data_to_device(inputs, device)


def as_candidates(candidates: np.ndarray | Tensor, n_queries: int, n_docs: int) -> Tensor:
    """``[B, C]`` int64 CPU tensor of candidate indices, checked against the query and document counts."""
    cand = torch.as_tensor(np.array(candidates, dtype=np.int64, copy=True))  # copy: collators pass read-only views
    if cand.ndim != 2 or cand.shape[0] != n_queries:
        raise ValueError(f"candidates must be [B={n_queries}, C], got shape {tuple(cand.shape)}")
    if cand.numel() and (cand.min() < 0 or cand.max() >= n_docs):
        raise IndexError(f"candidate indices must lie in [0, {n_docs}), got [{cand.min()}, {cand.max()}]")
    return cand


class Teacher(nn.Module, ABC):
    """A scorer of (query, document) pairs; frozen for distillation (:meth:`freeze`) but trainable too.

    Subclasses set ``name`` and ``config`` (the constructor settings besides the path), and implement
    :meth:`prepare`, :meth:`forward` and ``_save`` (the weights and tokenizer of :meth:`save_pretrained`).
    """

    name: str = "teacher"
    config: dict

    @abstractmethod
    def prepare(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor
    ) -> dict[str, Tensor]:
        """CPU, picklable work (tokenisation); ``candidates[i, j]`` indexes ``docs`` (``[B, C]`` int64)."""

    @abstractmethod
    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 scores of a prepared batch (inputs are moved to the module's device)."""

    @abstractmethod
    def _save(self, path: Path) -> None:
        """Write weights and tokenizer to the folder ``path``."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def score(self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor) -> Tensor:
        """Eval-mode scores ``[B, C]`` (fp32, CPU) of ``queries`` × ``docs[candidates]``."""
        was_training = self.training
        self.eval()
        try:
            return self(self.prepare(queries, docs, candidates)).float().cpu()
        finally:
            self.train(was_training)

    def freeze(self) -> Teacher:
        """Eval mode (no dropout) and no gradients: a fixed teacher for distillation."""
        self.eval()
        self.requires_grad_(False)
        return self

    def weights_hash(self) -> str:
        """sha256 (hex) over the state dict (names, dtypes, shapes, bytes): the score store's provenance."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a folder that :meth:`from_pretrained` reads (HF-format weights + ``kdir_teacher.json``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save(path)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Teacher:
        """Load a kdir teacher folder (saved settings, updated by non-``None`` ``overrides``) or any HF model."""
        cfg_file = Path(str(path)) / CONFIG_NAME
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        return cls(path, **(config | {k: v for k, v in overrides.items() if v is not None}))
