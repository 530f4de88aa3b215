"""What every model offers, student or teacher: ``prepare`` / ``forward`` / ``freeze`` / provenance / save / load.

``prepare(queries, docs, candidates)`` turns ``B`` query texts, a list of distinct document texts and ``[B, C]``
candidate indices into ``docs`` into a flat dict of CPU tensors. It is the model's :meth:`Scorer.preparer`, a
small picklable object (tokenizers and settings, no weights) that dataloader workers carry instead of the model.
``forward`` moves the prepared inputs to the model's device and returns ``[B, C]`` fp32 scores (with gradients
when training). Checkpoints are Hugging Face folders plus ``kdir_model.json`` (the constructor settings).

Capabilities are class attributes, not probes: ``multi_vector`` (token embeddings, retrieved by MaxSim),
``uses_query_keys`` (``prepare`` needs the batch's query-id hashes) and :attr:`Scorer.embeds` (``embed`` /
``outputs`` return embeddings, for in-batch gathering and embedding matching).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from kdir.errors import KdirError

if TYPE_CHECKING:
    from kdir.data.batch import Preparer

CONFIG_NAME = "kdir_model.json"
LEGACY_CONFIG_NAMES = ("kdir_student.json", "kdir_teacher.json")  # folders written by earlier kdir versions


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


def read_settings(path: str | Path) -> dict[str, Any]:
    """The saved constructor settings of a kdir folder (``{}`` for a plain Hugging Face folder or hub name)."""
    for name in (CONFIG_NAME, *LEGACY_CONFIG_NAMES):
        file = Path(str(path)) / name
        if file.is_file():
            try:
                return json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise KdirError(f"{file}:{e.lineno}: expected the JSON settings of a kdir model ({e.msg})") from None
    return {}


class Scorer(nn.Module, ABC):
    """A scorer of (query, document) pairs: a student to train or a frozen teacher (:meth:`freeze`).

    Subclasses set ``name`` and ``config`` (the constructor settings besides the path), and implement
    :meth:`preparer`, :meth:`forward` and :meth:`_save` (the weights and tokenizer of :meth:`save_pretrained`).
    """

    name: ClassVar[str] = "scorer"
    multi_vector: ClassVar[bool] = False
    uses_query_keys: ClassVar[bool] = False
    # documents are encoded independently of the query, so a document encoded once serves every query that
    # ranks it: :meth:`query_reps` + :meth:`score_reps` (bi-encoders, ColBERT; not cross-encoders)
    separable: ClassVar[bool] = False
    non_scoring: ClassVar[tuple[str, ...]] = ()  # settings of `config` that do not change a frozen model's scores
    # Settings added after score stores began recording provenance, with the value earlier versions always used: at
    # that value a setting is left out of the provenance, so the stores of earlier versions still match.
    later_settings: ClassVar[dict[str, Any]] = {}
    config: dict

    @property
    def embeds(self) -> bool:
        """Whether :meth:`embed` / :meth:`outputs` give embeddings (dual encoders, dual-pooling cross-encoders)."""
        return False

    @abstractmethod
    def preparer(self) -> Preparer:
        """The picklable CPU tokenisation of a batch (what dataloader workers run)."""

    def prepare(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor, **kw: Any
    ) -> dict[str, Tensor]:
        """Tokenise a batch: ``candidates[i, j]`` indexes ``docs`` (``[B, C]`` int64); see :meth:`preparer`."""
        return self.preparer()(queries, docs, candidates, **kw)

    @abstractmethod
    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 scores of a prepared batch (inputs are moved to the module's device)."""

    def embed(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Query embeddings ``[B, dim]`` and document embeddings ``[D, dim]`` of a prepared batch."""
        raise KdirError(f"{type(self).__name__} does not embed queries and documents separately")

    def outputs(self, inputs: dict[str, Tensor], positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``[B, C]``, query embeddings ``[B, d]`` and each query's ``positive``-column document embedding."""
        raise KdirError(f"{type(self).__name__} gives no embeddings to match")

    def query_reps(self, queries: Sequence[str], query_keys: np.ndarray | None = None) -> tuple[Tensor, ...]:
        """The representations of ``queries`` (on the model's device) that :meth:`score_reps` scores; ``query_keys``
        are their id hashes, for models with :attr:`uses_query_keys`."""
        raise KdirError(f"{type(self).__name__} does not encode queries apart from their documents")

    def score_reps(self, queries: tuple[Tensor, ...], docs: tuple[Tensor, ...], candidates: Tensor) -> Tensor:
        """``[B, C]`` fp32 scores of :meth:`query_reps` against encoded documents at ``candidates [B, C]``.

        ``docs`` are one side's encodings of the distinct documents (``(emb [D, dim],)``, or ``(emb [D, L, dim],
        mask [D, L])`` for multi-vector models, as :func:`kdir.retrieval.encode.encode_batch` gives them);
        ``candidates[i, j]`` indexes their rows.
        """
        raise KdirError(f"{type(self).__name__} does not score pre-encoded documents")

    @abstractmethod
    def _save(self, path: Path) -> None:
        """Write weights and tokenizer to the folder ``path``."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def score(self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor, **kw: Any) -> Tensor:
        """Eval-mode scores ``[B, C]`` (fp32, CPU) of ``queries`` × ``docs[candidates]``."""
        was_training = self.training
        self.eval()
        try:
            return self(self.prepare(queries, docs, candidates, **kw)).float().cpu()
        finally:
            self.train(was_training)

    def freeze(self) -> Scorer:
        """Eval mode (no dropout) and no gradients: a fixed teacher for distillation."""
        self.eval()
        self.requires_grad_(False)
        return self

    def gradient_checkpointing_enable(self) -> Scorer:
        """Recompute each backbone's activations in the backward pass instead of storing them (Chen et al. 2016):
        less memory for longer inputs or larger batches, about one more forward pass of time. Every Hugging Face
        backbone of the model that supports it is switched (non-reentrant checkpointing)."""
        from transformers import PreTrainedModel

        backbones = [m for m in self.modules() if isinstance(m, PreTrainedModel)]
        if not backbones or not all(m.supports_gradient_checkpointing for m in backbones):
            raise KdirError(f"{type(self).__name__}: its backbone does not support gradient checkpointing")
        for m in backbones:
            if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.x's name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self

    def weights_hash(self) -> str:
        """sha256 (hex) over the state dict (names, dtypes, shapes, bytes)."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def scoring_settings(self) -> dict[str, Any]:
        """The settings of :attr:`config` that change a frozen model's scores: all but :attr:`non_scoring`, and but
        :attr:`later_settings` at their earlier value."""
        missing = object()
        return {
            k: v
            for k, v in self.config.items()
            if k not in self.non_scoring and self.later_settings.get(k, missing) != v
        }

    def provenance(self) -> dict[str, Any]:
        """What produced a score: the class, its scoring settings and the weights hash (recorded by the stores;
        :func:`kdir.stores.teacher_differences` compares two)."""
        return {"name": type(self).__name__, "config": self.scoring_settings(), "weights": self.weights_hash()}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a folder that :meth:`from_pretrained` reads (HF-format weights + ``kdir_model.json``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save(path)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Scorer:
        """Load a kdir folder (saved settings, updated by non-``None`` ``overrides``) or any HF model."""
        return cls(path, **(read_settings(path) | {k: v for k, v in overrides.items() if v is not None}))
