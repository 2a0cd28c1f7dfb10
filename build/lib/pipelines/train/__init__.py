"""Training: the config, the shuffled paired stream, the Ray Train workers and driver, metrics to MLflow."""
