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


def quiet_libraries(verbosity: int) -> None:
    """Below VERBOSE, the libraries' start-up lines are not shown (their warnings about failures are)."""
    if verbosity >= VERBOSE:
        return
    import optuna

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
