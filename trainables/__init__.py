"""Ray Tune trainables for dkd-tune: thin adapters from a trial's config to `dkd_tune.trial.run_trial`."""

from trainables.distill import distill_trial, distillation_trainable

__all__ = ["distill_trial", "distillation_trainable"]
