"""Scorer ensemble: the (weighted) mean of its members' scores.

Margin-MSE's T2 teacher (Hofstätter et al. 2020) is the plain mean of the raw logits of three BERT-CAT
cross-encoders: ``normalize="none"``, no weights. ``normalize="zscore"`` first standardises each member's
``[B, C]`` scores over the whole call (its mean and standard deviation over all ``B × C`` scores), which puts
members on one scale but makes a pair's score depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from kdir.errors import ConfigError, KdirError
from kdir.models.base import Scorer, read_settings

Normalize = Literal["none", "zscore"]
MODEL_NAMES = "ColBERT, CollectiveColBERT, CrossEncoder, DualEncoder, Ensemble"


class EnsemblePreparer:
    """The members' batch tokenisations, under the keys ``<member>.<key>`` (picklable)."""

    def __init__(self, members: Mapping[str, Callable[..., dict[str, Tensor]]]):
        self.members = dict(members)

    def __call__(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor
    ) -> dict[str, Tensor]:
        return {
            f"{name}.{k}": v for name, prep in self.members.items() for k, v in prep(queries, docs, candidates).items()
        }


class Ensemble(Scorer):
    """Mean of several teachers' scores.

    Args:
        members: the teachers, as a list (named ``0``, ``1``, ...) or a mapping name → teacher (as Hydra gives).
        normalize: ``none`` (raw scores) or ``zscore`` (each member standardised over the call, batch-dependent).
        weights: one weight per member (in order); the score is ``Σ w_m s_m / Σ w_m``. ``None``: plain mean.
    """

    name = "ensemble"

    def __init__(
        self,
        members: Sequence[Scorer] | Mapping[str, Scorer],
        normalize: Normalize = "none",
        weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if normalize not in ("none", "zscore"):
            raise ConfigError(f"normalize must be 'none' or 'zscore', got {normalize!r}")
        items = members.items() if isinstance(members, Mapping) else enumerate(members)
        self.members = nn.ModuleDict({str(name): m for name, m in items})
        if not self.members:
            raise ConfigError("an ensemble needs at least one member")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self.members) or sum(weights) <= 0:
                raise ConfigError(f"need {len(self.members)} weights with a positive sum, got {weights}")
        self.normalize, self.weights = normalize, weights
        self.config = dict(
            normalize=normalize,
            weights=weights,
            members={n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in self.members.items()},
        )

    def scoring_settings(self) -> dict:
        """``normalize``, ``weights`` and each member's class and scoring settings."""
        members = {n: {"name": type(m).__name__, "config": m.scoring_settings()} for n, m in self.members.items()}
        return {"normalize": self.normalize, "weights": self.weights, "members": members}

    def preparer(self) -> EnsemblePreparer:
        """Every member's tokenisation; prepared inputs are keyed ``<member>.<key>``."""
        return EnsemblePreparer({name: m.preparer() for name, m in self.members.items()})

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 (weighted) mean of the members' (optionally z-scored) scores."""
        total, weight_sum = None, 0.0
        for i, (name, member) in enumerate(self.members.items()):
            prefix = name + "."
            scores = member({k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}).float()
            if self.normalize == "zscore":
                std, mean = torch.std_mean(scores, correction=0)
                scores = (scores - mean) / std.clamp(min=1e-6)
            w = 1.0 if self.weights is None else self.weights[i]
            total = w * scores if total is None else total + w * scores.to(total.device)
            weight_sum += w
        return total / weight_sum

    def _save(self, path: Path) -> None:
        for name, member in self.members.items():
            member.save_pretrained(path / name)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Ensemble:
        """Load a saved ensemble: each member from its sub-folder with its recorded class (kdir's models only)."""
        from kdir import models

        config = read_settings(path) | overrides
        members = {}
        for name, qualname in config.pop("members").items():
            cls_name = str(qualname).rpartition(".")[2]  # the class, wherever an earlier version defined it
            member_cls = getattr(models, cls_name, None)
            if not (isinstance(member_cls, type) and issubclass(member_cls, Scorer)) or cls_name not in models.__all__:
                raise KdirError(
                    f"{path}: member {name!r} has class {qualname!r}, not one of kdir's models ({MODEL_NAMES})"
                )
            members[name] = member_cls.from_pretrained(Path(path) / name)
        return cls(members, **config)
