"""Symmetric label noise: rate, uniform wrong classes, never the clean label, determinism."""

import pytest
import torch

from dkd_tune.data import symmetric_label_noise


def test_rate_and_never_the_clean_label():
    clean = torch.randint(0, 100, (50_000,), generator=torch.Generator().manual_seed(0))
    noisy, realised = symmetric_label_noise(clean, 0.4, 100, seed=7)
    moved = noisy != clean
    assert realised == pytest.approx(float(moved.double().mean()))
    # Binomial(50000, 0.4): standard deviation 0.0022, so 5 sigma is 0.011.
    assert abs(realised - 0.4) < 0.011
    assert noisy.dtype == torch.int64 and noisy.min() >= 0 and noisy.max() < 100


def test_wrong_labels_are_uniform_over_the_other_classes():
    clean = torch.zeros(90_000, dtype=torch.int64)
    noisy, _ = symmetric_label_noise(clean, 0.5, 10, seed=1)
    counts = torch.bincount(noisy[noisy != 0], minlength=10)[1:].double()
    expected = counts.sum() / 9
    statistic = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(
        torch.special.gammaincc(
            torch.tensor(4.0, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
        )
    )
    assert p_value > 1e-3


def test_deterministic_for_a_seed():
    clean = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    first, rate = symmetric_label_noise(clean, 0.3, 10, seed=5)
    again, rate_again = symmetric_label_noise(clean, 0.3, 10, seed=5)
    other, _ = symmetric_label_noise(clean, 0.3, 10, seed=6)
    assert torch.equal(first, again) and rate == rate_again
    assert not torch.equal(first, other)


def test_zero_rate_is_identity_and_bad_rates_are_refused():
    clean = torch.arange(10)
    noisy, rate = symmetric_label_noise(clean, 0.0, 10, seed=0)
    assert torch.equal(noisy, clean) and rate == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            symmetric_label_noise(clean, bad, 10, seed=0)
