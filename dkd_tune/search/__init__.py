"""Floor 7, the search: its driver, the Tuner it assembles, its teacher tasks, its MLflow runs, Ray start-up, signals and replays."""
