"""recloop.evaluation."""
