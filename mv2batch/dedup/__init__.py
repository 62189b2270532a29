"""Near-duplicates among a run's embeddings: cosine nearest neighbours (exact or clustered) and the groups
written to OUT/report/duplicates.parquet."""
