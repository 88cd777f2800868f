"""Memory planning: predicted per-rank memory of a training run, and measured memory."""
