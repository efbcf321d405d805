"""Interventions on a teacher's logits move exactly what they claim to move and nothing else."""

from __future__ import annotations

import math

import pytest
import torch

from dkd_tune.core.losses import decoupled_terms
from dkd_tune.teacher.gap import measure_logit_gap
from dkd_tune.teacher.logit_interventions import IntervenedTeacher, LogitIntervention, permute_non_target

CLASSES, GROUPS = 20, 4
GROUP_OF = torch.arange(CLASSES) * GROUPS // CLASSES  # 5 classes per superclass


def batch(rows: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, CLASSES, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    logits[torch.arange(rows), labels] += 4  # mostly right, like a trained teacher
    return logits, labels, torch.arange(rows) + 1000


def gaps(logits, labels):
    target = logits.gather(1, labels[:, None]).squeeze(1)
    return target - logits.scatter(1, labels[:, None], -math.inf).amax(1)


def non_target_distribution(logits, labels, temperature=4.0):
    mask = torch.ones_like(logits, dtype=torch.bool).scatter(1, labels[:, None], False)
    return torch.softmax(logits[mask].view(len(labels), -1) / temperature, dim=1)


def test_the_identity_changes_nothing():
    logits, labels, indices = batch()
    assert LogitIntervention().is_identity
    assert torch.equal(LogitIntervention().apply(logits, labels, indices), logits)


def test_a_target_shift_moves_every_gap_by_the_shift_and_leaves_nckds_distribution_alone():
    logits, labels, indices = batch()
    shifted = LogitIntervention(target_shift=2.5).apply(logits, labels, indices)
    torch.testing.assert_close(gaps(shifted, labels), gaps(logits, labels) + 2.5)
    torch.testing.assert_close(
        non_target_distribution(shifted, labels), non_target_distribution(logits, labels)
    )
    # DKD's NCKD term (beta's term) is unchanged for any student; TCKD's is not.
    student = torch.randn_like(logits)
    before, after = (
        decoupled_terms(student, logits, labels, 4.0),
        decoupled_terms(student, shifted, labels, 4.0),
    )
    torch.testing.assert_close(after.nckd, before.nckd)
    assert not torch.allclose(after.tckd, before.tckd)


def test_a_scale_multiplies_the_gap_and_keeps_the_ranking():
    logits, labels, indices = batch()
    scaled = LogitIntervention(scale=0.5).apply(logits, labels, indices)
    torch.testing.assert_close(gaps(scaled, labels), 0.5 * gaps(logits, labels))
    assert torch.equal(scaled.argsort(dim=1), logits.argsort(dim=1))


def test_a_permutation_within_superclasses_keeps_the_gap_and_each_superclass_s_values():
    logits, labels, indices = batch()
    permuted = LogitIntervention(non_target="permuted_within_superclass").apply(
        logits, labels, indices, GROUP_OF
    )
    torch.testing.assert_close(gaps(permuted, labels), gaps(logits, labels))
    assert torch.equal(permuted.gather(1, labels[:, None]), logits.gather(1, labels[:, None]))
    for group in range(GROUPS):
        members = group == GROUP_OF
        # The multiset of values inside each superclass is kept, row by row...
        torch.testing.assert_close(
            permuted[:, members].sort(dim=1).values, logits[:, members].sort(dim=1).values
        )
    # ...and values do move (within their superclass), fixed per image.
    assert not torch.equal(permuted, logits)
    again = permute_non_target(logits[:10], labels[:10], indices[:10], class_groups=GROUP_OF)
    assert torch.equal(again, permuted[:10])


def test_a_permutation_across_all_classes_moves_values_between_superclasses():
    logits, labels, indices = batch(rows=256)
    permuted = LogitIntervention(non_target="permuted").apply(logits, labels, indices)
    torch.testing.assert_close(gaps(permuted, labels), gaps(logits, labels))
    moved = [
        not torch.allclose(
            permuted[:, g == GROUP_OF].sort(dim=1).values, logits[:, g == GROUP_OF].sort(dim=1).values
        )
        for g in range(GROUPS)
    ]
    assert all(moved)


def test_a_within_superclass_permutation_needs_the_superclasses():
    logits, labels, indices = batch()
    with pytest.raises(ValueError, match="class_groups"):
        LogitIntervention(non_target="permuted_within_superclass").apply(logits, labels, indices)
    with pytest.raises(ValueError, match="scale"):
        LogitIntervention(scale=0)


def test_the_gap_is_measured_through_the_intervention_and_the_wrapped_source_applies_it():
    from dkd_tune.data import ImageDataset
    from dkd_tune.data.batch import Batch

    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40) % CLASSES
    data = ImageDataset(
        images, labels, CLASSES, [str(c) for c in range(CLASSES)], (0.5,) * 3, (0.25,) * 3, "t"
    )
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, CLASSES))
    plain = measure_logit_gap(teacher, data, progress=False)
    shifted = measure_logit_gap(teacher, data, progress=False, intervention=LogitIntervention(target_shift=3))
    assert shifted.mean == pytest.approx(plain.mean + 3, abs=1e-5)
    assert shifted.non_target_entropy == pytest.approx(plain.non_target_entropy, abs=1e-6)
    scaled = measure_logit_gap(teacher, data, progress=False, intervention=LogitIntervention(scale=2))
    assert scaled.mean == pytest.approx(2 * plain.mean, rel=1e-5)
    assert scaled.standardized_mean == pytest.approx(plain.standardized_mean, rel=1e-5)  # scale-free

    class Source:
        def logits_for(self, b):
            return teacher(b.images.flatten(1).float())

    wrapped = IntervenedTeacher(Source(), LogitIntervention(target_shift=3))
    b = Batch(images.float(), labels, torch.arange(40), None)
    torch.testing.assert_close(gaps(wrapped.logits_for(b), labels), gaps(Source().logits_for(b), labels) + 3)
