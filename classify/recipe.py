"""Recipes: which candidate probes a run fits, and what each step of the full recipe bought.

``plain`` is the single-layer probe offshelf always fitted: standardised features, logistic
regression, C from 1e-5 to 1e3 by 3-fold CV. ``best`` adds the steps the off-the-shelf papers
used on the same frozen network, each chosen by cross-validation on the training images only:

* views averaged at extraction (``VIEWS=``, a store of its own, ``extract.extractor``): every
  views store in the dataset's folder is a candidate; the recipe extracts none by default, as
  flip did not pay for doubling extraction (README > Beyond the plain probe);
* the C range Kornblith et al. (CVPR 2019) searched, 1e-6 to 1e5, and the 3-fold CV repeated on
  3 seeded partitions of the training rows, so that the choice among many candidates rests on
  a less noisy estimate;
* fused layers: the top 2 and top 3 taps by CV score joined (``classify.fusion``);
* the normalisation (standardise, l2, signed square root + l2) chosen by CV like the layer.

The classifier (logistic regression or the linear SVM, ``--classifier auto``) can be chosen the
same way; the best recipe leaves it out because it did not pay (README > Beyond the plain probe).
Which rows a line of the ablation chooses among is told by their columns (search, C grid, views,
layer, normalisation, classifier), so rows of a custom run with the best recipe's search join it.

Every candidate is a row of ``results.csv`` (cached like any other); the rows of a recipe
carry its name. ``ablation`` replays the choice with the steps added one at a time, from the
same rows: what chose each line (its CV score) beside what it gave (its test numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from classify import fusion
from classify.evaluate import PROBE_RANGES, STREAMED_SEARCH
from classify.probe import DEFAULT_CS, WIDE_CS
from classify.results import PROBE_KINDS, select_best
from extract.arguments import check_params


@dataclass(frozen=True)
class Recipe:
    name: str
    classifiers: tuple[str, ...]
    normalizations: tuple[str, ...]
    Cs: tuple[float, ...]
    cv_repeats: int
    fuse: tuple[int, ...]

    def __post_init__(self):
        check_params(f"recipe {self.name!r}", {k: v for k, v in self.probe_settings().items() if k != "recipe"}, PROBE_RANGES)

    def probe_settings(self) -> dict:
        """The ``ProbeSettings`` fields this recipe sets."""
        return {"classifiers": self.classifiers, "normalizations": self.normalizations, "Cs": self.Cs,
                "cv_repeats": self.cv_repeats, "fuse": self.fuse, "recipe": self.name}


RECIPES = {
    "plain": Recipe("plain", ("logreg",), ("standard",), DEFAULT_CS, 1, ()),
    # The linear SVM is left out: as a candidate it never paid and its dual solver took many times
    # logistic regression's time at large C (README > Beyond the plain probe). `--classifier auto` adds it.
    "best": Recipe("best", ("logreg",), ("standard", "l2", "sqrt"), WIDE_CS, 3, (2, 3)),
}
DEFAULT_RECIPE = "plain"


def _grid(Cs) -> str:
    return ",".join(f"{c:g}" for c in Cs)  # as the Cs column holds it


def _searched_as(recipe: Recipe):
    """Rows whose C was searched as ``recipe`` searches it (its grid, its repeated CV), whatever else was set."""
    # k-fold CV with any k (--cv), on the recipe's number of partitions: cv3, cv5 / cv3x3, cv2x3
    # or streamed (``classify.evaluate.STREAMED_SEARCH``: the in-memory fit was over the memory budget)
    search = (rf"cv\d+x{recipe.cv_repeats}" if recipe.cv_repeats > 1 else r"cv\d+") + f"|{STREAMED_SEARCH}"
    return lambda r: r["search"].astype(str).str.fullmatch(search) & (r["Cs"].astype(str) == _grid(recipe.Cs))


def _single(rows):
    return ~rows["layer"].astype(str).str.contains(fusion.SEPARATOR, regex=False)


def _centre(rows):
    return rows["views"].fillna("centre").isin(["centre", ""])


_plain, _wide = _searched_as(RECIPES["plain"]), _searched_as(RECIPES["best"])
# (what the line adds, which rows it chooses among): each a superset of the one before, but for the
# first, today's probe. Rows are one backbone's (``backbone_of``) rows of the main protocol.
ABLATION_STEPS = (
    ("plain probe (standardised, logistic regression, C 1e-5..1e3 by 3-fold CV)",
     lambda r: _plain(r) & _centre(r) & _single(r) & (r["normalization"] == "standard") & (r["classifier"] == "logreg")),
    ("+ C 1e-6..1e5 by 3-fold CV on 3 partitions",
     lambda r: _wide(r) & _centre(r) & _single(r) & (r["normalization"] == "standard") & (r["classifier"] == "logreg")),
    ("+ views stores (VIEWS=flip, crops5, crops10: averaged views)",
     lambda r: _wide(r) & _single(r) & (r["normalization"] == "standard") & (r["classifier"] == "logreg")),
    ("+ fused layers (top 2 and top 3 taps by CV)",
     lambda r: _wide(r) & (r["normalization"] == "standard") & (r["classifier"] == "logreg")),
    ("+ normalisation by CV (standard, l2, sqrt) = RECIPE=best",
     lambda r: _wide(r) & (r["classifier"] == "logreg")),
    ("+ classifier by CV (logistic regression, linear SVM; --classifier auto)",
     lambda r: _wide(r)),
)


def backbone_of(row) -> str:
    """The store name without its views suffix: a backbone's centre and views stores side by side."""
    features, views = str(row["features"]), row.get("views")
    return features.removesuffix(f"-{views}") if isinstance(views, str) and views not in ("", "centre") else features


def ablation(rows: pd.DataFrame, metric: str = "mean_per_class_acc") -> pd.DataFrame:
    """Per CNN backbone, each step's choice by CV score among its rows: the step, the chosen layer,
    normalisation, classifier and store, its CV score, its test top-1 and mean per-class accuracy,
    and the change of ``metric`` from the plain probe. Empty without rows of the best recipe."""
    cnn = rows[rows["kind"] == "cnn"]
    if cnn.empty or not _wide(cnn).any():
        return pd.DataFrame()
    lines = []
    for backbone, group in cnn.groupby(cnn.apply(backbone_of, axis=1), sort=True):
        plain, previous = None, None
        for step, chooses in ABLATION_STEPS:
            among = chooses(group).to_numpy()
            chosen = select_best(group[among])
            if chosen is None or (previous is not None and np.array_equal(among, previous)):
                continue  # nothing to choose from, or nothing added (no views store)
            previous = among
            plain = chosen if plain is None else plain
            lines.append({"backbone": backbone, "step": step, "features": chosen["features"], "layer": chosen["layer"],
                          "normalization": chosen["normalization"], "classifier": chosen["classifier"], "C": chosen["C"],
                          "cv_score": chosen["cv_score"], "top1": chosen["top1"], "mean_per_class_acc": chosen["mean_per_class_acc"],
                          "mAP": chosen.get("mAP"), "change": chosen[metric] - plain[metric],
                          "n_train": chosen["n_train"], "n_test": chosen["n_test"],
                          "candidates": int(chooses(group).sum())})
    return pd.DataFrame(lines)


def chosen_among(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows a headline is chosen among: those searched as the best recipe searches (where it ran;
    the plain rows then only open its ablation), else every row; trained models' rows are kept."""
    wide = _wide(rows).to_numpy() if {"search", "Cs"} <= set(rows.columns) else np.zeros(len(rows), bool)
    if not wide.any():
        return rows
    return rows[wide | ~rows["kind"].isin(PROBE_KINDS).to_numpy()]
