"""How much a search says: -q (the summary), the default (a line per trial), -v (Ray Tune's tables
and the libraries' own logs); below -v the libraries' start-up chatter is kept out."""

from __future__ import annotations

import logging

QUIET, NORMAL, VERBOSE = 0, 1, 2
# Loggers whose INFO lines say nothing a user acts on: MLflow creating its tables, Optuna creating
# a study, Ray announcing token authentication (which stays on).
CHATTY_LOGGERS = (
    "mlflow.store.db.utils",
    "alembic.runtime.migration",
    "optuna.storages._rdb.storage",
    "optuna.study.study",
    "ray._private.authentication.authentication_token_setup",
)


# Ray Tune warnings that are no news to a user: results Ray could not read back for trials an
# interruption stopped mid-epoch (the search resumes them; its own results come from its folder), and
# a bookkeeping step that took half a second on a loaded machine. -v shows them.
NOISY_WARNINGS = {
    "ray.tune.analysis.experiment_analysis": "Failed to fetch metrics",
    "ray.tune.utils.util": "may be a performance bottleneck",
    "ray.tune.execution.tune_controller": "may be a performance bottleneck",
}


class _Without(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries(verbosity: int) -> None:
    """Below VERBOSE, the libraries' start-up lines are not shown (their warnings about failures are)."""
    if verbosity >= VERBOSE:
        return
    import optuna

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, text in NOISY_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Without) and f.text == text for f in logger.filters):
            logger.addFilter(_Without(text))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
