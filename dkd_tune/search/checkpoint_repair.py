"""Before Tune restores a part: put back the checkpoint its saved state names, when a kill outran the state.

Tune keeps one checkpoint per trial (`num_to_keep=1`): registering checkpoint K+1 deletes K, and
the experiment state that names K+1 is written a moment later. A search killed in between
(SIGKILL, a lost node) leaves a state that names K while only K+1 exists, and Tune's restore then
fails the trial ("does not exist on storage anymore"), losing its work. The newer checkpoint is
the same trial further on, so it is moved to the name the state expects: the trial resumes from
its latest epoch (the epoch is read from the checkpoint's own file), and Tune numbers its next
checkpoint K+1 again without meeting an existing folder.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint_"


def restore_missing_checkpoints(part_dir: Path) -> list[str]:
    """Move each unfinished trial's newest checkpoint to the name the saved state expects; the trial ids."""
    from ray.tune.experiment import Trial

    states = sorted(Path(part_dir).glob("experiment_state-*.json"))
    if not states:
        return []
    repaired = []
    for trial_json, run_metadata in json.loads(states[-1].read_text()).get("trial_data", []):
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.status == Trial.TERMINATED or trial.checkpoint is None:
            continue  # finished trials are not restored
        named = Path(trial.checkpoint.path)
        expected = Path(part_dir) / named.parent.name / named.name  # the part's folder may have moved
        if expected.exists():
            continue
        existing = sorted(path for path in expected.parent.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir())
        newer = [path for path in existing if path.name > expected.name]
        if newer:
            newer[-1].rename(expected)
            repaired.append(trial.trial_id)
    return repaired
