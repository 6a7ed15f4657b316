"""The backbone registry: each entry declares how to build the network, its input, and its taps."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
from extract.errors import UserError


@dataclass(frozen=True)
class FeatureInfo:
    """One tap: a stable ``name``, the Keras ``layer`` whose output it reads, and its shape facts."""

    name: str
    layer: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it offers.

    ``build(weights)`` returns a Keras model that takes RGB pixels in [0, 255] (the model
    holds its own normalisation) plus a description of the weights it loaded, including
    their SHA-256 where they came from a file.

    ``build_inference(weights)``, where a backbone has one, returns a faster model for
    inference only that computes the same function up to float rounding (EfficientNet-Lite:
    BatchNorm folded into the convolutions), the same weights record, and the names of the
    layers whose output differs from ``build``'s model (a tap on one of those reads ``build``'s).
    """

    name: str
    build: Callable[[str | None], tuple[keras.Model, dict]]
    input_size: int
    feature_info: tuple[FeatureInfo, ...]
    preprocessing: str
    crop_pct: float = 0.875
    interpolation: str = "auto"
    default_weights: str = "imagenet"
    offline_weights: bool = False
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    build_inference: Callable[[str | None], tuple[keras.Model, dict, frozenset[str]]] | None = None

    def tap(self, name: str) -> FeatureInfo:
        for info in self.feature_info:
            if info.name == name:
                return info
        raise KeyError(name)


_REGISTRY: dict[str, BackboneSpec] = {}
# "prefix:ARGUMENT" backbones made on demand, e.g. "cae:models/cae.keras"
_FACTORIES: dict[str, Callable[[str], BackboneSpec]] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise UserError(f"backbone {spec.name!r} is registered twice")
    names = [info.name for info in spec.feature_info]
    if len(set(names)) != len(names):
        raise UserError(f"backbone {spec.name!r} declares duplicate tap names: {names}")
    _REGISTRY[spec.name] = spec
    return spec


def register_factory(prefix: str, factory: Callable[[str], BackboneSpec]) -> None:
    _FACTORIES[prefix] = factory


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(fnmatch.filter(_REGISTRY, pattern))


def get_backbone(name: str) -> BackboneSpec:
    prefix, _, argument = name.partition(":")
    if argument and prefix in _FACTORIES:
        return _FACTORIES[prefix](argument)
    try:
        return _REGISTRY[name]
    except KeyError:
        made = ", ".join(f"{p}:PATH" for p in _FACTORIES)
        raise UserError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}; or {made}") from None


def layer_paths(model: keras.Model, prefix: str = "") -> list[str]:
    """Every layer, depth-first, as ``name`` or ``outer/inner`` for layers of nested models."""
    paths = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        paths.append(path)
        if isinstance(layer, keras.Model):
            paths += layer_paths(layer, f"{path}/")
    return paths


def tap_tensor(model: keras.Model, path: str):
    """The symbolic output of the layer at ``path`` (``outer/inner`` inside nested models),
    connected to ``model``'s inputs.

    ``model.get_layer("resnet50").get_layer("conv3_block4_out").output`` belongs to the
    nested model's own graph, and building a model from it raises "Graph disconnected".
    Here a sub-model from the nested model's input to the inner layer is called on the
    tensor that feeds the nested model in the outer graph: same layers, same weights.
    """
    head, _, rest = path.partition("/")
    try:
        layer = model.get_layer(head)
    except ValueError:
        raise UserError(f"{model.name} has no layer {head!r}; see `make layers` or keras' model.summary()") from None
    if not rest:
        return layer.output
    if not isinstance(layer, keras.Model):
        raise UserError(f"{path}: {head!r} is a {type(layer).__name__}, not a nested model")
    inner = keras.Model(layer.inputs, tap_tensor(layer, rest), name=f"{layer.name}_to_{rest.replace('/', '_')}")
    return inner(*_outer_inputs(model, layer))


def _outer_inputs(model: keras.Model, layer: keras.Model) -> list:
    """The tensors that feed ``layer`` inside ``model``'s graph (``layer.input`` would give the
    nested model's own input, which is not connected to the outer one)."""
    calls = [node for nodes in model._nodes_by_depth.values() for node in nodes if node.operation is layer]
    if len(calls) != 1:
        raise UserError(f"{layer.name!r} is called {len(calls)} times in {model.name!r}; a tap inside it is ambiguous")
    return calls[0].input_tensors
