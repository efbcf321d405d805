"""dkd-tune: hyperparameter search for Decoupled Knowledge Distillation."""

__version__ = "0.1.0"
