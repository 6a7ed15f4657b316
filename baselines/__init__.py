"""Hand-crafted image features, written in the same store format as the CNN features.
Importing this package registers every built-in baseline (``baselines.entries``)."""

from baselines import entries  # noqa: F401  (registers the built-in baselines)
from baselines.registry import DEFAULT_PRESET, PRESETS, REGISTRY, WORDS, build_baseline, list_baselines

__all__ = ["DEFAULT_PRESET", "PRESETS", "REGISTRY", "WORDS", "build_baseline", "list_baselines"]
