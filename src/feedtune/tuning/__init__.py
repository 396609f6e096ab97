"""Tuning: every Optuna call, the search-space rules, and the two stages of a study."""
