"""Training support for train.py: recipes, model registry, optimizer, checkpoints, logs, the loop."""
