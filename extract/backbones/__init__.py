"""Backbones by name. Importing this package registers every family."""

from extract.backbones import efficientnet_lite, keras_apps, saved  # noqa: F401  (register their variants)
from extract.backbones.registry import (
    BackboneSpec, FeatureInfo, get_backbone, layer_paths, list_backbones, register_backbone, tap_tensor,
)

__all__ = ["BackboneSpec", "FeatureInfo", "get_backbone", "layer_paths", "list_backbones", "register_backbone", "tap_tensor"]
