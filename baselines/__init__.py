"""Hand-crafted image features, written in the same store format as the CNN features."""
