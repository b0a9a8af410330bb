"""The experiment tool: an Optuna study over the clothing head, tracked in MLflow."""
