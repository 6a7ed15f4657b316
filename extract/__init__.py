"""Images to stored features: datasets, decoding, backbones, layer taps and the feature store."""

import importlib.metadata
import os

# TensorFlow's C++ start-up chatter buries the progress bars; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names``; packages that are not installed are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
