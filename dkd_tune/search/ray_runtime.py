"""Starting Ray for a search: a local node kept on 127.0.0.1, or the cluster at --address; Ray's resume hints kept out of the output."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dkd_tune.search.options import SearchOptions

# Ray replaces a local node's 127.0.0.1 by the machine's network address, and its servers then listen
# on every interface, unless this variable (read when Ray is imported) turns off multi-node clusters.
RAY_LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(options: SearchOptions) -> None:
    if not options.address:
        keep_local_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.tune.tune").addFilter(hide_tune_resume_hints)
    # Ray's per-checkpoint INFO lines and snapshot warnings drown the progress table; keep warnings.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table, with our columns
    settings: dict[str, Any] = {
        "log_to_driver": True,
        "logging_level": "WARNING",
        "logging_config": ray.LoggingConfig(log_level="WARNING"),
    }
    if options.address:
        ray.init(address=options.address, **settings)
    else:
        # Local Ray: every server on 127.0.0.1 only; the dashboard only when asked for.
        ray.init(
            include_dashboard=options.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **settings,
        )


def hide_tune_resume_hints(record: logging.LogRecord) -> bool:
    """Tune's own stop notice, "Tuner.restore(...)" hint and trial list: dkd-tune says these its own way."""
    message = record.getMessage()
    return not any(
        text in message for text in ("Tuner.restore", "Trials did not complete", "Stop signal received")
    )


def keep_local_ray_on_loopback() -> None:
    """Make a local Ray started by this process listen on 127.0.0.1 only, not on every interface."""
    os.environ[RAY_LOOPBACK_VARIABLE] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before the variable was set (a library caller)
        constants.ENABLE_RAY_CLUSTER = False
