"""KD/TCKD/NCKD/DKD: the identity of Eq. 12, agreement with the paper's definition, gradients, extremes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dkd_tune.core.losses import decoupled_terms, dkd_loss, kd_loss, nckd_loss, tckd_loss


def random_case(seed: int, batch: int, classes: int, scale: float, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=dtype) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=dtype) * scale
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, target


def paper_reference(student, teacher, target, temperature):
    """Eq. 12's pieces written from probabilities, as the appendix states them (float64 only)."""
    p_s = torch.softmax(student / temperature, dim=1)
    p_t = torch.softmax(teacher / temperature, dim=1)
    rows = torch.arange(len(target))
    pt_s, pt_t = p_s[rows, target], p_t[rows, target]
    mask = torch.ones_like(p_s, dtype=torch.bool)
    mask[rows, target] = False
    # 1 - p_t written as the sum of the non-target probabilities: the same quantity, without the
    # cancellation that 1 - p_t suffers when p_t is within rounding of 1.
    rest_s, rest_t = (p_s * mask).sum(1), (p_t * mask).sum(1)
    b_s = torch.stack([pt_s, rest_s], dim=1)
    b_t = torch.stack([pt_t, rest_t], dim=1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1)
    hat_s = (p_s * mask) / rest_s.unsqueeze(1)
    hat_t = (p_t * mask) / rest_t.unsqueeze(1)
    nckd = torch.where(mask, hat_t * (hat_t.log() - hat_s.log()), torch.zeros_like(hat_t)).sum(1)
    kd = (p_t * (p_t.log() - p_s.log())).sum(1)
    scale = temperature**2
    return kd * scale, tckd * scale, nckd * scale, rest_t


cases = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 16),  # batch
    st.integers(2, 1000),  # classes
    st.floats(0.5, 10.0),  # temperature
    st.floats(0.1, 8.0),  # logit scale
)


@settings(max_examples=200, deadline=None)
@given(cases)
def test_kd_decomposes_exactly_into_tckd_and_weighted_nckd(case):
    seed, batch, classes, temperature, scale = case
    student, teacher, target = random_case(seed, batch, classes, scale)
    terms = decoupled_terms(student, teacher, target, temperature)
    kd = kd_loss(student, teacher, temperature, reduction="none")
    recomposed = terms.tckd + terms.teacher_non_target_mass * terms.nckd
    torch.testing.assert_close(kd, recomposed, rtol=0, atol=1e-9)
    # The public per-sample functions agree with each other in the same way.
    tckd = tckd_loss(student, teacher, target, temperature, reduction="none")
    nckd = nckd_loss(student, teacher, target, temperature, reduction="none")
    p_t_teacher = torch.softmax(teacher / temperature, 1)[torch.arange(batch), target]
    torch.testing.assert_close(kd, tckd + (1 - p_t_teacher) * nckd, rtol=0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_terms_match_the_papers_probability_definitions(case):
    seed, batch, classes, temperature, scale = case
    student, teacher, target = random_case(seed, batch, classes, min(scale, 4.0))
    kd_ref, tckd_ref, nckd_ref, mass_ref = paper_reference(student, teacher, target, temperature)
    terms = decoupled_terms(student, teacher, target, temperature)
    torch.testing.assert_close(
        kd_loss(student, teacher, temperature, reduction="none"), kd_ref, rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(terms.tckd, tckd_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(terms.nckd, nckd_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(terms.teacher_non_target_mass, mass_ref, rtol=1e-9, atol=1e-12)


def test_dkd_is_weighted_sum_with_batch_mean_and_t_squared():
    student, teacher, target = random_case(0, 8, 100, 3.0)
    alpha, beta, temperature = 1.0, 8.0, 4.0
    _, tckd_ref, nckd_ref, _ = paper_reference(student, teacher, target, temperature)
    expected = (alpha * tckd_ref + beta * nckd_ref).mean()
    total = dkd_loss(student, teacher, target, alpha, beta, temperature)
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    parts = dkd_loss(student, teacher, target, alpha, beta, temperature, return_components=True)
    torch.testing.assert_close(parts.total, expected)
    torch.testing.assert_close(parts.tckd, tckd_ref.mean())
    torch.testing.assert_close(parts.nckd, nckd_ref.mean())
    per_sample = dkd_loss(student, teacher, target, alpha, beta, temperature, reduction="none")
    assert per_sample.shape == (8,)
    torch.testing.assert_close(
        per_sample.sum(), dkd_loss(student, teacher, target, alpha, beta, temperature, reduction="sum")
    )


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_gradients_pass_gradcheck_in_float64(classes, temperature):
    student, teacher, target = random_case(classes, 4, classes, 2.0)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for fn in (
        lambda s, t: dkd_loss(s, t, target, 1.0, 8.0, temperature, reduction="none"),
        lambda s, t: tckd_loss(s, t, target, temperature, reduction="none"),
        lambda s, t: nckd_loss(s, t, target, temperature, reduction="none"),
        lambda s, t: kd_loss(s, t, temperature, reduction="none"),
    ):
        assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-6)


def extreme_cases():
    generator = torch.Generator().manual_seed(7)
    big = torch.randn(6, 100, generator=generator) * 1e4
    one_hot_teacher = torch.full((6, 100), -1e4)
    one_hot_teacher[torch.arange(6), torch.arange(6)] = 1e4
    target = torch.arange(6)
    yield "huge logits", big, torch.randn(6, 100, generator=generator) * 1e4, target
    yield "one-hot teacher", torch.randn(6, 100, generator=generator), one_hot_teacher, target
    yield "one-hot teacher, student sure of another class", -one_hot_teacher, one_hot_teacher, target
    yield (
        "two classes",
        torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]]),
        torch.tensor([[-1e4, 1e4], [3.0, -3.0], [1e4, 1e4]]),
        torch.tensor([0, 1, 1]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_extreme_logits_give_finite_losses_and_gradients(dtype, temperature):
    for name, student, teacher, target in extreme_cases():
        student = student.to(dtype).requires_grad_(True)
        teacher = teacher.to(dtype)
        for loss in (
            dkd_loss(student, teacher, target, 1.0, 8.0, temperature),
            kd_loss(student, teacher, temperature),
        ):
            assert torch.isfinite(loss), (name, dtype)
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(grad).all(), (name, dtype)
            assert loss.dtype == torch.float32


def test_finite_under_cpu_autocast():
    student, teacher, target = random_case(3, 8, 100, 1e3, dtype=torch.float32)
    layer = torch.nn.Linear(100, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(student)
        assert logits.dtype == torch.bfloat16
        loss = dkd_loss(logits, teacher.bfloat16(), target, 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_student_and_teacher_give_zero(dtype):
    for _, logits, _, target in extreme_cases():
        logits = logits.to(dtype)
        assert dkd_loss(logits, logits, target, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
        assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_batch_of_one_and_known_value():
    # One sample, two classes, T = 1: TCKD is the binary KL and NCKD is 0 (one non-target class).
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_t = 0.75
    target = torch.tensor([0])
    terms = decoupled_terms(student, teacher, target, 1.0)
    expected_tckd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert terms.tckd.item() == pytest.approx(expected_tckd, abs=1e-12)
    assert terms.nckd.item() == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_raise_value_errors():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, logits, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(logits, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        kd_loss(torch.zeros(2, 1), torch.zeros(2, 1), 1.0)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(logits, logits, 1.0, reduction="batchmean")


@pytest.mark.parametrize("loss", ["tckd_loss", "nckd_loss"])
def test_decoupled_losses_average_over_the_batch_by_default(loss):
    import dkd_tune.core.losses as losses

    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    target = torch.arange(6) % 5
    function = getattr(losses, loss)
    per_sample = function(student, teacher, target, 2.0, reduction="none")
    assert function(student, teacher, target, 2.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
