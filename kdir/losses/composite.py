"""A weighted sum of loss terms, each logged on its own (``train/loss/<name>``).

EmbedDistill (Kim et al. 2023, https://arxiv.org/abs/2301.12005): ``L = L_score + α_Q·L_emb,Q [+ α_D·L_emb,D]
[+ λ·L_onehot]``; TCT-ColBERT's optional hard-label mix ``γ·L_CE + (1−γ)·L_KD``. Each term restricts itself to
the queries it ``applies_to`` (real, generated or all); hard-label terms take real queries only.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from kdir.errors import ConfigError
from kdir.losses.base import Candidates, Layout, Loss


class Composite(Loss):
    """``Σ_name weight_name · term_name`` over named terms (each term carries its own ``weight``/``applies_to``).

    Args:
        terms: name → :class:`Loss`; every term must use ``layout``. Terms with ``weight`` 0 are dropped.
        layout: the batch's candidate layout.
    """

    name = "composite"

    def __init__(self, terms: Mapping[str, Loss], layout: Layout = "inbatch"):
        super().__init__(layout, 1.0, "all")
        active = {name: term for name, term in terms.items() if term is not None and term.weight != 0}
        if not active:
            raise ConfigError("a composite loss needs at least one term with a non-zero weight")
        for name, term in active.items():
            if term.layout != layout:
                raise ConfigError(f"term {name!r} uses layout {term.layout!r}, the composite {layout!r}")
        self.parts = nn.ModuleDict(active)
        self.uses_teacher = any(t.uses_teacher for t in active.values())
        self.uses_embeddings = any(t.uses_embeddings for t in active.values())
        self.matches_batch_docs = any(getattr(t, "side", None) == "docs" for t in active.values())

    def terms(self, c: Candidates) -> dict[str, Tensor]:
        return {name: term(c) for name, term in self.parts.items()}

    def forward(self, c: Candidates) -> Tensor:
        return sum(self.terms(c).values())
