"""Per-step distillation diagnostics: pure functions of a batch's score tensors (no model, no host sync).

What a KD run is worth watching besides its loss (logged as ``train/kd/<name>`` on logging steps by
:class:`kdir.training.callbacks.KDDiagnostics`):

* **agreement** of student and teacher over each query's candidates: Spearman's ρ of the two score lists
  (average ranks for ties, as ``scipy.stats.spearmanr``), and top-1 agreement (the student's top candidate is
  one the teacher scores highest); both over the candidates the teacher scored (the mask);
* **scale**: mean and standard deviation of student and teacher scores (temperature-sensitive losses such as KL
  depend on it; Margin-MSE matches it outright);
* **margins**: each query's labelled positive minus the mean and minus the max of its negatives (the other
  candidates, not another labelled positive), for student and teacher: Margin-MSE's target
  (Hofstätter et al. 2020, https://arxiv.org/abs/2010.02666) and how confidently the positive is separated;
* **masked fraction**: the share of candidate pairs without a teacher score (NaN in the batch's teacher scores:
  pairs missing from the score store, ``signal.force=true``), which every teacher-based loss drops.

Every function returns tensors on the input's device; a statistic with no defined value (no row with two scored
candidates, no positive, constant scores) is NaN, as ``scipy.stats.spearmanr`` gives for constant input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "average_ranks",
    "grad_norm",
    "kd_statistics",
    "margins",
    "masked_mean_std",
    "spearman",
    "top1_agreement",
]


def _nanmean(x: Tensor) -> Tensor:
    """Mean over the non-NaN entries (NaN when there are none)."""
    keep = ~torch.isnan(x)
    return x.where(keep, 0.0).sum() / keep.sum()  # 0 / 0 = NaN


def masked_mean_std(scores: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation of the entries of ``scores`` where ``mask`` (all when ``None``)."""
    x = scores.detach().float()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    n = m.sum()
    mean = x.where(m, 0.0).sum() / n
    var = (x - mean).where(m, 0.0).pow(2).sum() / n
    return mean, var.sqrt()


def average_ranks(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B, C]`` 1-based ranks (ascending) of each row's entries among the row's entries where ``mask``.

    Tied values share the average of the ranks they span (``scipy.stats.rankdata(method="average")``); entries
    outside the mask get ranks past the row's valid ones (ignore them).
    """
    x = scores.detach().float()
    if mask is not None:
        x = x.masked_fill(~mask, float("inf"))  # sorted after every valid (finite) score of the row
    ordered = x.sort(dim=1).values.contiguous()
    x = x.contiguous()
    below = torch.searchsorted(ordered, x, side="left")  # entries smaller than each value
    upto = torch.searchsorted(ordered, x, side="right")  # entries smaller than or equal to it
    return (below + upto + 1).float() / 2


def spearman(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B]`` Spearman's ρ of each row's student and teacher scores over its ``mask`` ed candidates.

    ρ is the Pearson correlation of the average ranks (ties handled as ``scipy.stats.spearmanr``); NaN for a row
    with fewer than two candidates or with constant scores on either side.
    """
    m = torch.ones_like(student, dtype=torch.bool) if mask is None else mask
    w = m.float()
    n = w.sum(1)
    rs, rt = average_ranks(student, m), average_ranks(teacher, m)
    rs = rs.where(m, 0.0) - (rs.where(m, 0.0).sum(1) / n)[:, None]
    rt = rt.where(m, 0.0) - (rt.where(m, 0.0).sum(1) / n)[:, None]
    cov = (rs * rt * w).sum(1)
    var_s, var_t = (rs.pow(2) * w).sum(1), (rt.pow(2) * w).sum(1)
    rho = cov / (var_s * var_t).sqrt()
    return rho.where(n >= 2, float("nan"))


def top1_agreement(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B]`` 1.0 where the student's top-scored candidate has the teacher's highest score of the row, else 0.0.

    Over the ``mask`` ed candidates; a teacher tie for the top counts as agreement with either; NaN for a row with
    no candidate.
    """
    m = torch.ones_like(student, dtype=torch.bool) if mask is None else mask
    s = student.detach().float().masked_fill(~m, float("-inf"))
    t = teacher.detach().float().masked_fill(~m, float("-inf"))
    pick = s.argmax(dim=1, keepdim=True)
    agree = (t.gather(1, pick)[:, 0] == t.max(dim=1).values).float()
    return agree.where(m.any(1), float("nan"))


def margins(
    scores: Tensor, positive: Tensor, mask: Tensor | None = None, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``[B]`` positive − mean negative and positive − max negative of each row.

    Args:
        scores: ``[B, C]`` scores.
        positive: ``[B]`` column of each row's labelled positive, ``-1`` for none (a generated query).
        mask: ``[B, C]`` bool, the candidates that count (e.g. those with a teacher score).
        exclude: ``[B, C]`` bool, candidates that are not negatives although not the positive (other labelled
            positives of the query: ``Candidates.false_negative``).

    A row with no positive, a positive outside ``mask``, or no negative is NaN.
    """
    x = scores.detach().float()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    has = positive >= 0
    col = positive.clamp(min=0)[:, None]
    own = torch.zeros_like(m).scatter_(1, col, True)
    neg = m & ~own
    if exclude is not None:
        neg = neg & ~exclude
    n_neg = neg.sum(1)
    pos = x.gather(1, col)[:, 0]
    mean_neg = x.where(neg, 0.0).sum(1) / n_neg
    max_neg = x.masked_fill(~neg, float("-inf")).max(dim=1).values
    valid = has & m.gather(1, col)[:, 0] & (n_neg > 0)
    nan = torch.full_like(pos, float("nan"))
    return (pos - mean_neg).where(valid, nan), (pos - max_neg).where(valid, nan)


def kd_statistics(
    student: Tensor,
    teacher: Tensor | None,
    positive: Tensor,
    mask: Tensor | None = None,
    false_negative: Tensor | None = None,
) -> dict[str, Tensor]:
    """The batch's diagnostics by name, each a 0-d tensor (row statistics averaged over rows, NaN rows skipped).

    ``student_mean`` / ``student_std`` and the student's margins ``student_margin_mean`` (positive − mean
    negative) / ``student_margin_max`` (positive − max negative) always; with ``teacher`` scores also the teacher's,
    ``spearman``, ``top1_agreement`` and ``masked_fraction`` (share of pairs without a teacher score, ``~mask``).
    Student statistics are taken over the candidates the teacher scored, so both sides describe the same pairs.
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        m = mask if teacher is not None else None
        sides = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
        for side, scores in sides.items():
            out[f"{side}_mean"], out[f"{side}_std"] = masked_mean_std(scores, m)
            gap_mean, gap_max = margins(scores, positive, m, false_negative)
            out[f"{side}_margin_mean"], out[f"{side}_margin_max"] = _nanmean(gap_mean), _nanmean(gap_max)
        if teacher is not None:
            out["spearman"] = _nanmean(spearman(student, teacher, m))
            out["top1_agreement"] = _nanmean(top1_agreement(student, teacher, m))
            out["masked_fraction"] = (~m).float().mean() if m is not None else student.new_zeros((), dtype=torch.float)
    return out


def grad_norm(tensors: Iterable[Tensor]) -> Tensor | None:
    """Total L2 norm of the gradients ``tensors`` (as ``torch.nn.utils.clip_grad_norm_`` measures it before
    clipping); ``None`` when there are none."""
    grads = [g.detach() for g in tensors if g is not None]
    if not grads:
        return None
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: fused per device and dtype
    if total is not None:
        return total(grads, 2.0).float()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
