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
    assert infonce(scores, positive).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_infonce_temperature_scales_logits():
    scores = torch.tensor([[0.2, 0.1]])
    expected = -math.log(math.exp(0.2 / 0.05) / (math.exp(0.2 / 0.05) + math.exp(0.1 / 0.05)))
    assert infonce(scores, torch.tensor([0]), temperature=0.05).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_mask_removes_false_negatives_but_never_the_positive():
    scores = torch.tensor([[1.0, 5.0, 0.0]])
    mask = torch.tensor([[False, False, True]])  # the positive (col 0) is forced back in
    expected = -math.log(math.e / (math.e + 1.0))
    assert infonce(scores, torch.tensor([0]), mask).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_class_uses_false_negative_mask():
    student = torch.tensor([[1.0, 5.0, 0.0]])
    c = Candidates(student, None, torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool),
                   torch.tensor([[False, True, False]]), "inbatch")  # fmt: skip
    assert InfoNCE()(c).item() == pytest.approx(-math.log(math.e / (math.e + 1.0)), rel=1e-6)


def test_margin_mse_class_requires_teacher():
    c = Candidates(torch.zeros(1, 2), None, torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool),
                   torch.zeros(1, 2, dtype=torch.bool), "pairwise")  # fmt: skip
    with pytest.raises(ValueError, match="teacher"):
        MarginMSE()(c)
