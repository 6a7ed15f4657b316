"""Images to stored features: datasets, decoding, backbones, layer taps and the feature store."""

import os

# TensorFlow's C++ start-up chatter buries the progress bars; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
