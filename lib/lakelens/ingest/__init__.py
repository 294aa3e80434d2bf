"""Getting images in: paths and ids, decoding, the embedder core, the embeddings table and the embed job.
Only table, listing and embed_job import pyspark."""
