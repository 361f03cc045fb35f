"""Evaluation: generation, tasks, metrics, task loss, test-time compute, lm-eval adapter."""
