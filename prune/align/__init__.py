"""Caption-image agreement: the rule that removes pairs whose caption does not describe the image."""
