"""Fused layers: several taps of one store joined into one feature vector, probed like a layer.

A fused layer is named by its taps joined with ``+`` (``stage6+pre_logits``), low to high. The
probe normalises each tap's block on its own before the blocks are joined
(``classify.probe.BlockNormalizer``), so a 1,280-value tap and a 320-value tap weigh alike.
Stores hold taps only; fused layers exist in ``results.csv`` and in saved probes.
"""

from __future__ import annotations

import numpy as np

from extract.errors import UserError

SEPARATOR = "+"


def parts(layer: str) -> list[str]:
    """The taps of ``layer``: itself, or the taps a fused name joins."""
    return layer.split(SEPARATOR)


def is_fused(layer: str) -> bool:
    return SEPARATOR in layer


def fused_name(taps, order: list[str]) -> str:
    """The name of the fusion of ``taps``, listed low to high as in ``order`` (a store's taps)."""
    return SEPARATOR.join(sorted(set(taps), key=order.index))


def check_layer(store, layer: str) -> None:
    missing = [tap for tap in parts(layer) if tap not in store.taps]
    if missing:
        raise UserError(f"{store.path} has no layer {', '.join(map(repr, missing))} (asked for {layer!r}); it has {store.taps}")
    if len(set(parts(layer))) != len(parts(layer)):
        raise UserError(f"fused layer {layer!r} names a tap twice; name each tap once, e.g. stage6+pre_logits")


def blocks(store, layer: str) -> tuple[int, ...] | None:
    """The widths of a fused layer's taps (what the probe normalises one by one), None for one tap."""
    return tuple(store.dim(tap) for tap in parts(layer)) if is_fused(layer) else None


def dim(store, layer: str) -> int:
    return sum(store.dim(tap) for tap in parts(layer))


def depth(store, layer: str) -> int:
    """A fused layer sits at the depth of its highest tap."""
    return max(store.taps.index(tap) for tap in parts(layer))


def features(store, layer: str, rows=None) -> np.ndarray:
    """The (n, D) features of a tap or of a fused layer (its taps side by side)."""
    if not is_fused(layer):
        return store.features(layer, rows)
    return np.concatenate([store.features(tap, rows) for tap in parts(layer)], axis=1)


def iter_chunks(store, layer: str, rows, chunk_rows: int = 4096):
    """``FeatureStore.iter_chunks`` for a tap or a fused layer."""
    if not is_fused(layer):
        yield from store.iter_chunks(layer, rows, chunk_rows)
        return
    readers = [store.iter_chunks(tap, rows, chunk_rows) for tap in parts(layer)]
    for pieces in zip(*readers):
        yield pieces[0][0], np.concatenate([block for _, block in pieces], axis=1)


def candidates(rows: list[dict], sizes, order: list[str]) -> list[str]:
    """Fused layers to try from the single layers' rows of one store: the top ``k`` taps by CV score,
    for each ``k`` in ``sizes`` (a tap's score: the best ``cv_score`` of its rows; ties to the higher
    tap). Chosen on training rows only, like every layer."""
    score: dict[str, float] = {}
    for row in rows:
        value = row.get("cv_score")
        if is_fused(row["layer"]) or value is None or not np.isfinite(value):
            continue
        score[row["layer"]] = max(score.get(row["layer"], -np.inf), float(value))
    ranked = sorted(score, key=lambda tap: (-score[tap], -order.index(tap)))
    names = [fused_name(ranked[:k], order) for k in sorted(set(sizes)) if 2 <= k <= len(ranked)]
    return list(dict.fromkeys(names))
