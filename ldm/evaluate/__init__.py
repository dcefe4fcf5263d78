"""The evaluate stage: the guidance sweep of a training run, tracked in MLflow, best point registered."""
