"""Near-duplicate groups of the embeddings table (`lakelens dedup`)."""
