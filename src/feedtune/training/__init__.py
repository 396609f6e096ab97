"""Training: models, the loop (``engine``), checkpoints, the trainer and throughput measuring.
No MLflow and no Optuna here: hooks reach the loop as callbacks."""
