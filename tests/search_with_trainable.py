"""Runs or resumes a search like `dkd-tune run|resume`, with a test trainable in place of dkd-tune's own.

    python tests/search_with_trainable.py run SPACE_FILE MODULE:FUNCTION
    python tests/search_with_trainable.py resume SEARCH_FOLDER MODULE:FUNCTION

The command line has no option for a custom trainable (a library user passes
`SearchOptions(trainable=...)`); the fault-injection and load tests use this instead.
"""

from __future__ import annotations

import importlib
import sys

from dkd_tune.config.loading import load_search_space
from dkd_tune.core.errors import UserInputError
from dkd_tune.search.driver import resume_search, run_search
from dkd_tune.search.options import SearchOptions


def main(argv: list[str]) -> int:
    action, target, trainable_name = argv
    module_name, function_name = trainable_name.split(":")
    options = SearchOptions(trainable=getattr(importlib.import_module(module_name), function_name))
    try:
        if action == "run":
            outcome = run_search(load_search_space(target), target, options)
        else:
            outcome = resume_search(target, options)
    except UserInputError as error:
        print(f"dkd-tune: error: {error}", file=sys.stderr)
        return 2
    print(outcome.table)
    print(f"results: {outcome.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
