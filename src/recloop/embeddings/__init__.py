"""recloop.embeddings."""
