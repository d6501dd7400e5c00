"""recloop.serving."""
