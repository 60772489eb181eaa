"""DVC stages: thin scripts, one per stage, run as `python -m stages.<name>` from the repo root."""
