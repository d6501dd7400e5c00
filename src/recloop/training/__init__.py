"""recloop.training."""
