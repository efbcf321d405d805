"""Floor 8, the commands beside `run`: single runs, suggest-beta, validate-beta's workflow, the MLflow UI."""
