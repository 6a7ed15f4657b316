"""What offshelf reads back is checked, not trusted (issue #23, section 1): codebooks beside a
store, the raw baseline's size, and features that are not finite, at extraction and at probe time."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baselines.__main__ import build
from extract.datasets import load_dataset
from extract.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


# -- codebooks: recomputed and checked on load, relearned on any mismatch ---------------------------

def _forge(saved: dict, how: str, key: str) -> dict:
    """The codebook's arrays tampered with ``how``, its settings and recorded SHA-256 kept."""
    forged = dict(saved)
    array = saved[key].copy()
    if how == "nan":
        array[0, 0] = np.nan
    elif how == "zero":
        array[:] = 0
    elif how == "shuffled":
        array = array[::-1].copy()
    elif how == "cut":
        array = array[:2]
    forged[key] = array
    return forged


@pytest.mark.parametrize("encoding,key,how", [*(("vlad", "centers", how) for how in ("nan", "zero", "shuffled", "cut")),
                                              ("fisher", "means", "shuffled"), ("fisher", "pca_components", "nan")])
def test_a_tampered_codebook_is_named_and_relearned_not_reused(image_tree, tmp_path, caplog, encoding, key, how):
    dataset = load_dataset(f"folder:{image_tree}")
    path = tmp_path / "cb.npz"
    genuine = build(encoding, dataset, preset="fast", words=4, dense=True)
    genuine.fit_dataset(dataset, path)
    image = dataset.read(0)
    expected = genuine.prepare(image)[genuine.taps[0]]
    with np.load(path) as saved:
        np.savez(path, **_forge({k: saved[k] for k in saved.files}, how, key))

    again = build(encoding, dataset, preset="fast", words=4, dense=True)
    with caplog.at_level(logging.INFO, logger="baselines.local"):
        again.fit_dataset(dataset, path)
    assert "reusing codebook" not in caplog.text
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning and "learning it again" in warning, warning
    assert again.codebook_sha256 == genuine.codebook_sha256  # relearned, seeded: the genuine codebook, the same fingerprint
    np.testing.assert_array_equal(again.prepare(image)[again.taps[0]], expected)
    with np.load(path) as saved:
        assert again.codebook_problem({k: saved[k] for k in saved.files}) is None  # the file is the genuine one again


# -- raw pixels: the size comes from the settings, never from the first image ----------------------

def test_raw_thumbnails_are_32_pixels_whatever_the_first_image(tmp_path):
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "test" / "a" / "0.png")  # the first image listed: 1x1
    dataset = load_dataset(f"folder:{root}")
    assert dataset.read(0).shape[:2] == (1, 1)
    raw = build("raw", dataset)
    assert raw.fingerprint()["side"] == 32 and raw.dims == {"raw": 1024}
    assert raw.prepare(dataset.read(1)).shape == (1024,)
