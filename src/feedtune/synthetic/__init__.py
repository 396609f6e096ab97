"""The embedded dataset: rendered locally, never downloaded."""
