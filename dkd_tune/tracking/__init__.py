"""Floor 5, tracking: one interface to the tracking store (store.py), dkd-tune's runs on it (runs.py), run statuses, and MLflow as its implementation; no Ray."""
