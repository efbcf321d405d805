"""Floor 4, the search file: its schema, loading and checks, `--set`, the plan of a search and the folder it lives in."""
