"""recloop.streaming."""
