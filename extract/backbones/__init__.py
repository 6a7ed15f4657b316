"""Backbones by name. Importing this package registers every family."""

from extract.backbones import efficientnet_lite  # noqa: F401  (registers its variants)
from extract.backbones.registry import BackboneSpec, FeatureInfo, get_backbone, list_backbones, register_backbone

__all__ = ["BackboneSpec", "FeatureInfo", "get_backbone", "list_backbones", "register_backbone"]
