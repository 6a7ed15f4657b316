"""The rule of thumb's regimes, named once, and what its table says: learning curves, the best
regime per size, and where one regime overtakes another.

The experiment (``transfer.rule_of_thumb``) checks regime names against ``REGIME``; the report
(``classify.report``) orders, summarises and compares them with the functions here. Nothing here
imports Keras, so drawing a report does not load TensorFlow.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pandas as pd

RULE_OF_THUMB_CSV = "rule_of_thumb.csv"  # beside results.csv
REGIME = re.compile(r"probe(:.+)?|head|top([1-9][0-9]*)|all|scratch")
REGIMES_TEXT = "probe, probe:<tap>, head, top1, top2, ..., all, scratch"


def regime_depth(regime: str) -> float:
    """How much of the network a regime trains, to order them: probe < head < top1 < top2 < ... < all;
    scratch apart; a name outside the grammar (a hand-edited table) last."""
    match = REGIME.fullmatch(str(regime))
    if match is None:
        return 1e5
    if match.group(2):
        return int(match.group(2))
    return {"head": 0.5, "all": 1e3, "scratch": 1e4}.get(regime, 0)  # probe, probe:<tap>: 0


def rule_of_thumb_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over draws (population std, as the few-shot rows) of the test top-1 of each (regime, images per class)."""
    return table.groupby(["regime", "per_class"])["top1"].agg(mean="mean", std=lambda s: s.std(ddof=0), count="count").reset_index()


def rule_of_thumb_winners(curves: pd.DataFrame) -> pd.DataFrame:
    """Per size, the regime(s) with the highest mean test top-1, ties joined (a description of the curves)."""
    rows = []
    for k, group in curves.groupby("per_class"):
        best = group["mean"].max()
        tied = sorted(group.loc[np.isclose(group["mean"], best), "regime"], key=regime_depth)
        rows.append({"per_class": k, "best regime": ", ".join(tied), "top-1": best})
    return pd.DataFrame(rows)


class Crossover(NamedTuple):
    """One finding, read as ``<regime> <verb> <reference> <when>``: "top1 beats probe from 20 images per class on"."""

    regime: str
    verb: str
    reference: str
    when: str


def rule_of_thumb_crossovers(curves: pd.DataFrame, reference: str = "probe") -> list[Crossover]:
    """Where each regime beats the linear probe (the rule's starting point): from which size on, at
    which sizes only, or never; and where scratch beats training everything from ImageNet."""
    pivot = curves.pivot(index="per_class", columns="regime", values="mean").sort_index()
    sizes = pivot.index.to_numpy()
    pairs = [(reference, r) for r in sorted(pivot.columns, key=regime_depth) if r != reference and reference in pivot]
    if {"all", "scratch"} <= set(pivot.columns):
        pairs.append(("all", "scratch"))
    found = []
    for fewer, more in pairs:
        ahead = (pivot[more] > pivot[fewer] + 1e-9).to_numpy()
        from_here = [k for j, k in enumerate(sizes) if ahead[j:].all()]
        if not ahead.any():
            found.append(Crossover(more, "never beats", fewer, f"(sizes {', '.join(map(str, sizes))} per class)"))
        elif from_here:
            found.append(Crossover(more, "beats", fewer, f"from {from_here[0]} images per class on"))
        else:
            found.append(Crossover(more, "beats", fewer, f"at {', '.join(str(k) for k, a in zip(sizes, ahead) if a)} images per class only"))
    return found
