"""Demo and test data: Fashion-MNIST from the Debian package, written as img2dataset shards."""
