"""Floor 5, tracking: MLflow naming, tags and client calls, and run statuses; no Ray."""
