"""recloop.algos."""
