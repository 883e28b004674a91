"""Ray Tune searches over recipes: SPACE.yaml (space.py), ASHA/PBT/Optuna trials (search.py)."""
