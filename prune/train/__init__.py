"""Training a self-supervised encoder: SimCLR augmentation, projection head and loss."""
