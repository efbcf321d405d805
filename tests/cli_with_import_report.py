"""Runs `dkd-tune ARGS...` like `python -m dkd_tune`, then records which heavy libraries the process imported.

The bad-input suite runs every case through this: a refused input must not have imported Ray (so
Ray was not started). The report is a JSON file named by the environment variable below, written
at exit whatever the exit code.
"""

import atexit
import json
import os
import sys

REPORT_VARIABLE = "DKD_TEST_IMPORT_REPORT"
WATCHED = ("ray", "mlflow", "optuna")


def _report() -> None:
    path = os.environ.get(REPORT_VARIABLE)
    if path:
        with open(path, "w") as file:
            json.dump({name: name in sys.modules for name in WATCHED}, file)


if __name__ == "__main__":
    atexit.register(_report)
    from dkd_tune.cli import main

    main(sys.argv[1:])
