"""Knowledge-distillation losses: classic KD and its decoupling into TCKD and NCKD (DKD, paper Eq. 8-12).

Notation follows the paper's appendix A.1. With p = softmax(z / T):

    KD   = KL(p^T || p^S)                                         (Hinton, scaled by T^2)
    TCKD = KL(b^T || b^S),   b = [p_t, 1 - p_t]                   (target vs all non-targets)
    NCKD = KL(p̂^T || p̂^S),   p̂_i = p_i / (1 - p_t) for i != t     (among the non-targets)
    KD   = TCKD + (1 - p_t^T) * NCKD                              (Eq. 12)
    DKD  = alpha * TCKD + beta * NCKD

Every quantity is computed from log-probabilities. The non-target classes are *gathered* into
a (N, C-1) tensor instead of being masked with a large constant, so the decomposition is exact
and no probability is ever passed through a log: logits of magnitude 1e4 give finite losses and
gradients in float32. Inputs are upcast to float32 (or kept in float64), which is what makes the
losses safe under bf16/fp16 autocast. All terms carry the T^2 factor and, with
``reduction="mean"``, the batch mean that the official implementation uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]


class DecoupledTerms(NamedTuple):
    """Per-sample TCKD and NCKD (already scaled by T^2) and the teacher's non-target mass 1 - p_t^T."""

    tckd: torch.Tensor
    nckd: torch.Tensor
    teacher_non_target_mass: torch.Tensor


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits / T in at least float32: bf16/fp16 softmax statistics are too coarse for a KL."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return logits / temperature


def _check_inputs(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> None:
    if logits_student.dim() != 2 or logits_student.shape != logits_teacher.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape (N, C), got "
            f"{tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}"
        )
    if logits_student.shape[1] < 2:
        raise ValueError(f"distillation needs at least 2 classes, got {logits_student.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _reduce(per_sample: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _non_target_index(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C-1) column indices of every class except each row's target, in class order."""
    columns = torch.arange(num_classes - 1, device=target.device)
    return columns.unsqueeze(0) + (columns.unsqueeze(0) >= target.unsqueeze(1)).long()


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probabilities; terms with p = 0 contribute exactly 0."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    temperature: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Hinton's KD: T^2 * KL(softmax(z_T / T) || softmax(z_S / T))."""
    _check_inputs(logits_student, logits_teacher, temperature)
    log_p_student = F.log_softmax(_scaled_logits(logits_student, temperature), dim=1)
    log_p_teacher = F.log_softmax(_scaled_logits(logits_teacher, temperature), dim=1)
    per_sample = _kl_from_log_probs(log_p_teacher, log_p_student) * temperature**2
    return _reduce(per_sample, reduction)


def decoupled_terms(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
) -> DecoupledTerms:
    """Per-sample TCKD and NCKD (T^2-scaled), computed exactly in log space."""
    _check_inputs(logits_student, logits_teacher, temperature)
    student = _scaled_logits(logits_student, temperature)
    teacher = _scaled_logits(logits_teacher, temperature)
    target = target.long()
    non_target = _non_target_index(target, student.shape[1])

    def binary_and_non_target_log_probs(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target_logit = scaled.gather(1, target.unsqueeze(1))  # (N, 1)
        non_target_logits = scaled.gather(1, non_target)  # (N, C-1)
        non_target_lse = torch.logsumexp(non_target_logits, dim=1, keepdim=True)
        all_lse = torch.logaddexp(target_logit, non_target_lse)
        log_b = torch.cat([target_logit - all_lse, non_target_lse - all_lse], dim=1)  # log [p_t, 1 - p_t]
        log_p_hat = non_target_logits - non_target_lse  # log of the renormalised non-target distribution
        return log_b, log_p_hat

    log_b_student, log_p_hat_student = binary_and_non_target_log_probs(student)
    log_b_teacher, log_p_hat_teacher = binary_and_non_target_log_probs(teacher)
    scale = temperature**2
    return DecoupledTerms(
        tckd=_kl_from_log_probs(log_b_teacher, log_b_student) * scale,
        nckd=_kl_from_log_probs(log_p_hat_teacher, log_p_hat_student) * scale,
        teacher_non_target_mass=log_b_teacher[:, 1].exp(),
    )


def tckd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Target-class KD: T^2 * KL(b^T || b^S) over the binary split [p_t, 1 - p_t]."""
    return _reduce(decoupled_terms(logits_student, logits_teacher, target, temperature).tckd, reduction)


def nckd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Non-target-class KD: T^2 * KL(p̂^T || p̂^S) among the non-target classes."""
    return _reduce(decoupled_terms(logits_student, logits_teacher, target, temperature).nckd, reduction)


class DKDLoss(NamedTuple):
    """DKD total with its two parts, each already reduced (weighted parts: alpha*TCKD, beta*NCKD)."""

    total: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor


def dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    reduction: Reduction = "mean",
    return_components: bool = False,
) -> torch.Tensor | DKDLoss:
    """Decoupled KD: alpha * TCKD + beta * NCKD (T^2-scaled, batch mean by default).

    With ``return_components=True`` returns ``DKDLoss(total, tckd, nckd)`` where ``tckd`` and
    ``nckd`` are the unweighted terms (for logging); ``total`` is what to back-propagate.
    """
    terms = decoupled_terms(logits_student, logits_teacher, target, temperature)
    total = _reduce(alpha * terms.tckd + beta * terms.nckd, reduction)
    if not return_components:
        return total
    return DKDLoss(total, _reduce(terms.tckd, reduction), _reduce(terms.nckd, reduction))


# ------------------------------------------------------------------------------------------------
# The loss modes: one table read by the search file's schema, the CLI, the training loop and the
# analysis. Adding a mode is a row here (and its tests).

# (student logits, teacher logits, labels, recipe) -> (weighted distillation term, unweighted terms)
Distillation = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


@dataclass(frozen=True)
class LossMode:
    """One way to train a student: CE plus (after the warm-up factor) this mode's distillation term."""

    name: str
    objective: str  # what it minimises, in words (CLI help, README, schema)
    distillation: Distillation | None  # None: cross-entropy alone, no teacher needed
    terms: tuple[str, ...] = ()  # unweighted terms it logs every epoch, as train_<term>
    uses_beta: bool = False  # whether the recipe's beta weights anything (auto-beta applies)

    @property
    def needs_teacher(self) -> bool:
        return self.distillation is not None


def _kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: Any):
    kd = kd_loss(student, teacher, recipe.temperature)
    return recipe.kd_weight * kd, {"kd": kd}


def _decoupled_means(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: Any):
    terms = decoupled_terms(student, teacher, labels, recipe.temperature)
    return terms.tckd.mean(), terms.nckd.mean()


def _dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: Any):
    tckd, nckd = _decoupled_means(student, teacher, labels, recipe)
    return recipe.alpha * tckd + recipe.beta * nckd, {"tckd": tckd, "nckd": nckd}


def _tckd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: Any):
    tckd, nckd = _decoupled_means(student, teacher, labels, recipe)
    return recipe.alpha * tckd, {"tckd": tckd, "nckd": nckd}


def _nckd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: Any):
    tckd, nckd = _decoupled_means(student, teacher, labels, recipe)
    return recipe.beta * nckd, {"tckd": tckd, "nckd": nckd}


LOSS_MODES: dict[str, LossMode] = {
    mode.name: mode
    for mode in (
        LossMode("ce", "cross-entropy alone (the student without a teacher)", None),
        LossMode("kd", "CE + kd_weight * KD (Hinton)", _kd, terms=("kd",)),
        LossMode("dkd", "CE + alpha * TCKD + beta * NCKD", _dkd, terms=("tckd", "nckd"), uses_beta=True),
        LossMode("tckd", "CE + alpha * TCKD (ablation, A.4)", _tckd, terms=("tckd", "nckd")),
        LossMode("nckd", "CE + beta * NCKD (ablation, A.4)", _nckd, terms=("tckd", "nckd"), uses_beta=True),
    )
}
LOSS_MODE_NAMES = tuple(LOSS_MODES)
LOGGED_TERMS = tuple(dict.fromkeys(term for mode in LOSS_MODES.values() for term in mode.terms))
