"""Loss values against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdir.losses import Candidates, InfoNCE, MarginMSE, infonce, margin_mse


def test_margin_mse_hand_computed():
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, -1.0]])
    t = torch.tensor([[10.0, 7.0, 9.0], [5.0, 5.0, 4.0]])
    # student margins: [2, 1], [-1, 1]; teacher margins: [3, 1], [0, 1]
    # squared errors: (2-3)^2=1, (1-1)^2=0, (-1-0)^2=1, (1-1)^2=0 -> mean 0.5
    assert margin_mse(s, t).item() == pytest.approx(0.5)


def test_margin_mse_single_negative_matches_hofstaetter_formula():
    s = torch.tensor([[2.5, 0.5]])
    t = torch.tensor([[8.0, 1.0]])
    assert margin_mse(s, t).item() == pytest.approx(((2.5 - 0.5) - (8.0 - 1.0)) ** 2)  # 25


def test_margin_mse_is_invariant_to_per_row_shifts_of_teacher():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    shifted = t + torch.tensor([[100.0], [-3.0], [0.5], [7.0]])
    assert margin_mse(s, t).item() == pytest.approx(margin_mse(s, shifted).item(), rel=1e-5)


def test_margin_mse_mask_drops_margins_with_missing_scores():
    s = torch.tensor([[3.0, 1.0, 2.0]])
    t = torch.tensor([[10.0, 7.0, 9.0]])
    mask = torch.tensor([[True, False, True]])
    # only the margin to column 2 counts: (1 - 1)^2 = 0
    assert margin_mse(s, t, mask).item() == pytest.approx(0.0)


def test_margin_mse_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 1\+n\]"):
        margin_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        MarginMSE(layout="inbatch")


def test_margin_mse_fp32_under_bf16_inputs():
    s = torch.tensor([[12.0, 11.0]], dtype=torch.bfloat16)
    t = torch.tensor([[10.0, 7.0]])
    assert margin_mse(s, t).dtype == torch.float32


def test_infonce_hand_computed():
    scores = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 3.0]])
    positive = torch.tensor([0, 2])
    row0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    row1 = -math.log(math.exp(3) / (2 * math.e + math.exp(3)))
    assert infonce(scores, positive).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_infonce_temperature_scales_logits():
    scores = torch.tensor([[0.2, 0.1]])
    expected = -math.log(math.exp(0.2 / 0.05) / (math.exp(0.2 / 0.05) + math.exp(0.1 / 0.05)))
    assert infonce(scores, torch.tensor([0]), temperature=0.05).item() == pytest.approx(expected, rel=1e-5)


def test_infonce_mask_removes_false_negatives_but_never_the_positive():
    scores = torch.tensor([[1.0, 5.0, 0.0]])
    mask = torch.tensor([[False, False, True]])  # the positive (col 0) is forced back in
    expected = -math.log(math.e / (math.e + 1.0))
    assert infonce(scores, torch.tensor([0]), mask).item() == pytest.approx(expected, rel=1e-5)


def test_infonce_class_uses_false_negative_mask():
    student = torch.tensor([[1.0, 5.0, 0.0]])
    c = Candidates(
        student,
        None,
        torch.tensor([0]),
        torch.ones(1, 3, dtype=torch.bool),
        torch.tensor([[False, True, False]]),
        "inbatch",
    )
    assert InfoNCE()(c).item() == pytest.approx(-math.log(math.e / (math.e + 1.0)), rel=1e-5)


def test_margin_mse_class_requires_teacher():
    c = Candidates(
        torch.zeros(1, 2),
        None,
        torch.tensor([0]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.zeros(1, 2, dtype=torch.bool),
        "pairwise",
    )
    with pytest.raises(ValueError, match="teacher"):
        MarginMSE()(c)


# ---------------------------------------------------------------- KL (TCT-ColBERT, CollectiveKD)
def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_kl_hand_computed_with_teacher_temperature():
    from kdir.losses import kl_divergence

    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    pt = _softmax([0.5 / 0.25, 0.0])  # teacher logits divided by tau_teacher = 0.25 -> [2, 0]
    ps = _softmax([1.0, 0.0])  # student logits raw (tau_student = 1)
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert kl_divergence(s, t).item() == pytest.approx(expected, rel=1e-5)
    # direction: KL(teacher || student), not KL(student || teacher)
    reverse = sum(b * math.log(b / a) for a, b in zip(pt, ps))
    assert abs(expected - reverse) > 1e-3
    # student temperature divides the student's logits
    ps2 = _softmax([1.0 / 2.0, 0.0])
    expected2 = sum(a * math.log(a / b) for a, b in zip(pt, ps2))
    assert kl_divergence(s, t, tau_student=2.0).item() == pytest.approx(expected2, rel=1e-5)


def test_kl_sums_over_candidates_and_averages_over_queries():
    from kdir.losses import kl_divergence

    s = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.25, 0.5], [0.25, 0.0, 0.0]])
    rows = []
    for si, ti in zip(s.tolist(), t.tolist()):
        pt, ps = _softmax([x / 0.25 for x in ti]), _softmax(si)
        rows.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    assert kl_divergence(s, t).item() == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_kl_mask_removes_candidates_from_both_distributions():
    from kdir.losses import kl_divergence

    s, t = torch.tensor([[1.0, 9.0, 0.0]]), torch.tensor([[0.5, -9.0, 0.0]])
    mask = torch.tensor([[True, False, True]])
    expected = kl_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])).item()
    assert kl_divergence(s, t, mask).item() == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(s, s * 0.25).item() == pytest.approx(0.0, abs=1e-7)  # P_t == P_s


def test_kl_class_needs_teacher_and_logs_name():
    from kdir.losses import KLDistill

    loss = KLDistill()
    assert (loss.layout, loss.tau_teacher, loss.tau_student, loss.name) == ("inbatch", 0.25, 1.0, "kl")
    c = Candidates(
        torch.zeros(1, 2),
        None,
        torch.tensor([0]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.zeros(1, 2, dtype=torch.bool),
        "inbatch",
    )
    with pytest.raises(ValueError, match="teacher"):
        loss(c)


# ---------------------------------------------------------------- EmbedDistill terms
def test_softmax_ce_distill_hand_computed():
    from kdir.losses import softmax_ce_distill

    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # teacher uniform -> -(0.5 log p0 + 0.5 log p1) with p = softmax([2, 0])
    p = _softmax([2.0, 0.0])
    assert softmax_ce_distill(s, t).item() == pytest.approx(-0.5 * (math.log(p[0]) + math.log(p[1])), rel=1e-5)
    # one temperature for both sides
    p = _softmax([1.0, 0.0])
    assert softmax_ce_distill(s, t, temperature=2.0).item() == pytest.approx(
        -0.5 * (math.log(p[0]) + math.log(p[1])), rel=1e-6
    )


def test_embed_match_distances_hand_computed():
    from kdir.losses import embed_match

    s, t = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert embed_match(s, t, "l2").item() == pytest.approx((5.0 + 0.0) / 2)  # Euclidean, NOT squared (25)
    assert embed_match(s, t, "mse").item() == pytest.approx((9 + 16 + 0 + 0) / 4)
    a, b = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [5.0, 0.0]])
    assert embed_match(a, b, "cosine").item() == pytest.approx((1.0 + 0.0) / 2)


def test_embed_match_projection_when_dimensions_differ():
    from kdir.losses import EmbedMatch

    loss = EmbedMatch(side="query", student_dim=3, teacher_dim=2)
    assert loss.projection is not None and loss.name == "embed_match_query"
    with torch.no_grad():
        loss.projection.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        loss.projection.bias.zero_()
    s, t = torch.tensor([[3.0, 0.0, 7.0]]), torch.tensor([[0.0, 4.0]])
    c = Candidates(
        torch.zeros(1, 1),
        None,
        torch.tensor([0]),
        torch.ones(1, 1, dtype=torch.bool),
        torch.zeros(1, 1, dtype=torch.bool),
        "inbatch",
        embeddings={"query": (s, t)},
    )
    assert loss(c).item() == pytest.approx(5.0)  # ||(0,4) - (3,0)||
    assert EmbedMatch(student_dim=4, teacher_dim=4).projection is None


def _mixed_batch():
    """Rows 0, 1 real (positives at columns 0, 1); row 2 generated (no positive)."""
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    q_s, q_t = torch.zeros(3, 2), torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    return Candidates(
        student,
        teacher,
        torch.tensor([0, 1, -1]),
        torch.ones(3, 2, dtype=torch.bool),
        torch.zeros(3, 2, dtype=torch.bool),
        "inbatch",
        generated=torch.tensor([False, False, True]),
        embeddings={"query": (q_s, q_t)},
    )


def test_generated_queries_never_receive_hard_labels():
    from kdir.losses import EmbedMatch

    c = _mixed_batch()
    real_only = infonce(c.student[:2], torch.tensor([0, 1]))
    assert InfoNCE()(c).item() == pytest.approx(real_only.item(), rel=1e-6)  # row 2 (positive -1) left out
    for bad in ("generated", "all"):
        with pytest.raises(ValueError, match="hard labels"):
            InfoNCE(applies_to=bad)
        with pytest.raises(ValueError, match="hard labels"):
            MarginMSE(applies_to=bad)
        with pytest.raises(ValueError, match="hard labels"):
            EmbedMatch(side="doc", applies_to=bad)
    # an only-generated batch gives the hard-label term zero weight and no gradient
    only_gen = c.select(torch.tensor([False, False, True]))
    value = InfoNCE()(only_gen)
    value.backward()
    assert value.item() == 0.0 and c.student.grad.abs().sum().item() == 0.0


def test_composite_weighted_sum_and_per_term_rows():
    from kdir.losses import Composite, EmbedMatch, SoftmaxCEDistill, softmax_ce_distill

    c = _mixed_batch()
    loss = Composite(
        {
            "score": SoftmaxCEDistill(),
            "emb_q": EmbedMatch("query", weight=0.5),
            "gen_only": EmbedMatch("query", applies_to="generated", weight=2.0),
            "hard": InfoNCE(weight=0.1),
            "off": InfoNCE(weight=0.0),
        }
    )
    terms = loss.terms(c)
    assert set(terms) == {"score", "emb_q", "gen_only", "hard"}
    assert terms["score"].item() == pytest.approx(softmax_ce_distill(c.student, c.teacher).item(), rel=1e-5)
    assert terms["emb_q"].item() == pytest.approx(0.5 * (5.0 + 0.0 + 10.0) / 3, rel=1e-6)  # all rows
    assert terms["gen_only"].item() == pytest.approx(2.0 * 10.0, rel=1e-6)  # the generated row only
    assert terms["hard"].item() == pytest.approx(0.1 * infonce(c.student[:2], torch.tensor([0, 1])).item(), rel=1e-5)
    assert loss(c).item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)
    assert loss.uses_teacher and loss.uses_embeddings
    with pytest.raises(ValueError, match="layout"):
        Composite({"m": MarginMSE()}, layout="inbatch")
