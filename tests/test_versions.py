"""Each kind of output has its own version constant (CONTRIBUTING.md): bumping one makes the next
run refuse the stores it versions (or refit the probe rows), and leaves every other output alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import baselines.hog
import baselines.local
import baselines.simple
import classify.results
import extract.extractor
from baselines import build_baseline
from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
from classify.results import read_results, update_results
from extract.datasets import load_dataset
from extract.datasets.base import ImageDataset
from extract.extractor import CNNFeaturizer
from extract.pipeline import extract_to_store
from extract.store import StoreMismatchError, StoreWriter


def _extract_all(dataset, featurizers, folder):
    return {name: extract_to_store(dataset, f, folder / f"{name}.h5", progress=False) for name, f in featurizers.items()}


def _featurizers(dataset, folder):
    made = {name: build_baseline(name, dataset, preset="fast") for name in ("hog", "raw", "color", "sift_bow")}
    made["sift_bow"].fit_dataset(dataset, folder / "sift_bow.codebook.npz")
    made["cnn"] = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem")
    return made


@pytest.mark.parametrize("bump", ["cnn", "hog", "raw", "sift_bow"])
def test_a_bumped_features_version_refuses_its_stores_and_no_other(image_tree, tmp_path, monkeypatch, bump):
    dataset = load_dataset(f"folder:{image_tree}")
    paths = _extract_all(dataset, _featurizers(dataset, tmp_path), tmp_path)
    written = {name: path.stat().st_mtime_ns for name, path in paths.items()}
    if bump == "cnn":
        monkeypatch.setattr(extract.extractor, "FEATURES_VERSION", extract.extractor.FEATURES_VERSION + 1)
    elif bump == "hog":
        monkeypatch.setattr(baselines.hog, "FEATURES_VERSION", baselines.hog.FEATURES_VERSION + 1)
    elif bump == "raw":
        monkeypatch.setitem(baselines.simple.FEATURES_VERSION, "raw", baselines.simple.FEATURES_VERSION["raw"] + 1)
    else:
        monkeypatch.setitem(baselines.local.DESCRIPTOR_VERSIONS, "sift", baselines.local.DESCRIPTOR_VERSIONS["sift"] + 1)
    featurizers = _featurizers(dataset, tmp_path)  # as the next run builds them (a codebook is relearned for a new descriptor)
    for name, featurizer in featurizers.items():
        if name == bump:
            with pytest.raises(StoreMismatchError, match="features_version"):
                extract_to_store(dataset, featurizer, paths[name], progress=False)
        else:  # up to date: not rewritten
            assert extract_to_store(dataset, featurizer, paths[name], progress=False) == paths[name]
            assert paths[name].stat().st_mtime_ns == written[name], name


def _blob_store(path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    X = (rng.normal(size=(60, 8)) + 3 * np.eye(3, 8)[y]).astype(np.float32)
    splits = np.where(np.arange(60) % 3 == 0, "test", "train")
    dataset = ImageDataset("blobs", ("a", "b", "c"), tuple(f"x{i}" for i in range(60)), y, tuple(splits), read=None)
    with StoreWriter(path, dataset=dataset, extractor=path.stem, fingerprint={"toy": 1}, taps=["layer"]) as writer:
        writer.write_shard(np.arange(60), {"layer": X})
        writer.finalize()
    return path


def test_a_bumped_probes_version_refits_the_probe_rows_and_keeps_trained_rows(tmp_path, monkeypatch):
    store, csv = _blob_store(tmp_path / "s.h5"), tmp_path / "results.csv"
    settings, given = ProbeSettings(("logreg",), Cs=(0.1, 1.0)), parse_protocol("given")
    update_results(csv, Evaluation(store, given, settings).run(progress=False))
    trained = {**read_results(csv).iloc[0].to_dict(), "kind": "finetune", "features": "efficientnet_lite0", "probe_version": np.nan}
    update_results(csv, [trained])
    again = Evaluation(store, given, settings, results=read_results(csv))
    again.run(progress=False)
    assert again.cached == 1  # the same code: served from results.csv

    monkeypatch.setattr(classify.results, "PROBES_VERSION", classify.results.PROBES_VERSION + 1)
    bumped = Evaluation(store, given, settings, results=read_results(csv))
    update_results(csv, bumped.run(progress=False))
    assert bumped.cached == 0  # refitted
    table = pd.read_csv(csv)
    probes = table[table["kind"] != "finetune"]
    assert probes["probe_version"].tolist() == [classify.results.PROBES_VERSION]  # the old version's row went
    assert (table["kind"] == "finetune").sum() == 1  # a trained run is not a probe: untouched
