"""recloop.artifacts."""
