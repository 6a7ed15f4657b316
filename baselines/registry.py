"""The registry of hand-crafted baselines, and their presets.

Each baseline is one entry: a builder ``(dataset, options) -> featurizer`` with what it
computes, the paper it follows and the published number it is meant to reproduce. A new
baseline is one ``@register`` function. ``list_baselines("sift*")`` filters by pattern;
``build_baseline(name, dataset, preset=...)`` makes the featurizer.

Presets: ``paper`` (default) follows the papers' settings where this machine can afford
them (see the README's baselines table for each setting's source and what differs);
``fast`` is the cheaper setting of offshelf 0.1 (detected keypoints, RootSIFT, small
codebooks), for quick looks; ``full`` adds what ``paper`` leaves out for cost
(Chatfield et al.'s 3 px step and 1x1 + 3x1 Fisher layout: 160k-dim vectors).
Every setting lands in the store's fingerprint, the preset included.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from baselines.descriptors import DescriptorSpec
from extract.arguments import SEEDS, check, whole
from extract.errors import UserError

PHOW_BINS = (4, 6, 8, 10)  # Bosch et al. 2007; vl_phow's default sizes, as Chatfield et al. 2011 used

PRESETS: dict[str, dict] = {
    "paper": {
        "sift": DescriptorSpec("sift", dense=True, side=256, step=6, bin_sizes=PHOW_BINS),
        "surf": DescriptorSpec("surf", dense=False, side=256),
        "sift_bow": {"words": 400, "levels": 3, "chi2": True, "root": False},
        "surf_bow": {"words": 800, "levels": 1, "root": False},
        "vlad": {"words": 256, "root": True},
        "fisher": {"words": 256, "pca_dim": 80, "layout": ((1, 1),), "root": False},
    },
    "fast": {
        "sift": DescriptorSpec("sift", dense=False, side=256),
        "surf": DescriptorSpec("surf", dense=False, side=256),
        "sift_bow": {"words": 1000, "levels": 2, "root": True},
        "surf_bow": {"words": 1000, "levels": 2, "root": False},
        "vlad": {"words": 64, "root": True},
        "fisher": {"words": 16, "pca_dim": 64, "root": True},
    },
}
PRESETS["full"] = {**PRESETS["paper"], "sift": replace(PRESETS["paper"]["sift"], step=3),
                   "fisher": {**PRESETS["paper"]["fisher"], "layout": ((1, 1), (3, 1))}}
DEFAULT_PRESET = "paper"
# --dense on a preset of detected keypoints: offshelf 0.1's grid (8 px step, 16 px patches).
DENSE_GRID = {"step": 8, "bin_sizes": (4,)}
WORDS = whole(2)  # a codebook's words (Fisher: Gaussian modes)


@dataclass(frozen=True)
class Options:
    """What a builder may use: the preset's name and settings, and the command line's overrides."""

    preset: str = DEFAULT_PRESET
    seed: int = 0
    dense: bool | None = None
    words: int | None = None
    codebook_split: str | None = None
    settings: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check("baselines", "words", self.words, WORDS, optional=True)
        check("baselines", "seed", self.seed, SEEDS)


@dataclass(frozen=True)
class Baseline:
    name: str
    build: Callable
    store: str
    what: str
    source: str
    reproduces: str
    uses: str | None = None  # the descriptor spec it shares, if any


REGISTRY: dict[str, Baseline] = {}


def register(name: str, *, store: str | None = None, what: str, source: str, reproduces: str = "", uses: str | None = None):
    def decorator(build):
        if name in REGISTRY:
            raise ValueError(f"baseline {name!r} is registered twice")
        REGISTRY[name] = Baseline(name, build, store or name, what, source, reproduces, uses)
        return build

    return decorator


def list_baselines(pattern: str = "*") -> list[str]:
    return [name for name in REGISTRY if fnmatch.fnmatch(name, pattern)]


def build_baseline(name: str, dataset, *, preset: str = DEFAULT_PRESET, seed: int = 0, dense: bool | None = None,
                   words: int | None = None, codebook_split: str | None = None):
    """The featurizer of baseline ``name`` under ``preset``; codebook baselines still need ``fit_codebooks``."""
    if name not in REGISTRY:
        raise UserError(f"unknown baseline {name!r}; valid: {', '.join(REGISTRY)}")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    options = Options(preset, seed, dense, words, codebook_split, PRESETS[preset])
    return REGISTRY[name].build(dataset, options)
