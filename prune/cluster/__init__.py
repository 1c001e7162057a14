"""Prototypes: faiss spherical k-means on a sample, distributed Lloyd refinement, assignment."""
