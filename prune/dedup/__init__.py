"""Semantic deduplication (SemDeDup): near-duplicates inside each cluster, removed before selection."""
