"""Tracking: every MLflow call, the callbacks that record a training run, the one best-run
finder, plots and worker liveness."""
