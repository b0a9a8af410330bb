"""The experiment tool: an Optuna study over a classifier head on your image folders, tracked in MLflow."""
