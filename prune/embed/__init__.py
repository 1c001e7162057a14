"""From image bytes to unit-norm vectors: decoding to the model's crop, the embedding backends
(a registry), encoder checkpoints and the small-image architectures."""
