"""diffmem: memorization and regularization in score-based diffusion models."""

from diffmem import metrics, samplers, schedules, scores

__version__ = "0.1.0"

__all__ = ["__version__", "metrics", "samplers", "schedules", "scores"]
