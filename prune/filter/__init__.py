"""Basic filtering of image-text samples by their img2dataset metadata (size, shape, caption)."""
