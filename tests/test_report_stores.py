"""Report sections read from the stores themselves: the machine and software that computed each one
(recorded at extraction), and a random-weights control beside its pretrained backbone.

Real tiny runs: a seeded two-convolution Keras model (conftest ``tiny``) and the HOG and colour
baselines on generated images, probed by ``python -m classify probe``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from baselines.__main__ import run_baselines
from classify.report import write_report
from classify.report.markdown import md
from classify.report.sections import UNRECORDED
from extract.datasets import load_dataset
from extract.extractor import CNNFeaturizer
from extract.pipeline import extract_to_store, store_path
from extract.store import FeatureStore, canonical_json


def _classify(*args) -> None:
    from classify.cli import main

    assert main(list(args)) == 0


def _probe_and_report(tree: Path, base: Path) -> str:
    dirs = ["--dataset", f"folder:{tree}", "--features-dir", str(base / "features"), "--results-dir", str(base / "results"),
            "--reports-dir", str(base / "reports")]
    _classify("probe", *dirs, "--cs", "0.01,1", "--no-progress")
    return write_report(base / "results" / tree.name / "results.csv", base / "reports" / tree.name, features_dir=base / "features").read_text()


def _rewrite_run(path: Path, change) -> None:
    """``change(run)`` on the store's run record, in place: as another machine or an older offshelf left it."""
    with h5py.File(path, "a") as raw:
        run = json.loads(raw.attrs["run"])
        change(run)
        raw.attrs["run"] = canonical_json(run)


def test_stores_record_what_computed_them_and_the_report_shows_it(tiny, image_tree, tmp_path):
    import keras
    import tensorflow as tf

    dataset = load_dataset(f"folder:{image_tree}")
    features = tmp_path / "features"
    cnn = CNNFeaturizer(tiny, batch_size=8)
    cnn_path = extract_to_store(dataset, cnn, store_path(features, dataset, cnn), progress=False)
    hog_path, color_path = run_baselines(dataset, ["hog", "color"], features_dir=features, processes=0, progress=False)

    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    for path in (cnn_path, hog_path, color_path):
        with FeatureStore(path) as store:
            environment, fingerprint = store.run["environment"], canonical_json(store.fingerprint)
        assert environment["host"] == platform.node() and environment["cores"] == len(os.sched_getaffinity(0))
        assert f"model name\t: {environment['cpu']}\n" in cpuinfo
        assert {"avx2", "avx512f"} & flags == {"avx2", "avx512f"} & set(environment["isa"]) and set(environment["isa"]) <= flags
        assert len(environment["gpus"]) == len(tf.config.list_physical_devices("GPU"))
        assert environment["keras_backend"] == keras.backend.backend()
        versions = environment["versions"]
        assert (versions["python"], versions["tensorflow"], versions["keras"], versions["numpy"], versions["h5py"]) == (
            platform.python_version(), tf.__version__, keras.__version__, np.__version__, h5py.__version__)
        assert {"scikit-learn", "opencv-python-headless"} <= set(versions)
        assert json.loads(json.dumps(environment)) == environment
        # a record, not a setting: nothing of the machine is in the fingerprint a store is checked by
        assert environment["host"] not in fingerprint and environment["cpu"] not in fingerprint

    # The CNN store as if computed elsewhere, the colour store as 0.2.0 left it (no record).
    _rewrite_run(cnn_path, lambda run: run["environment"].update(host="elsewhere", cpu="Another CPU", isa=[], gpus=["NVIDIA H200"]))
    _rewrite_run(color_path, lambda run: run.pop("environment"))
    written = cnn_path.stat().st_mtime_ns
    extract_to_store(dataset, CNNFeaturizer(tiny, batch_size=8), cnn_path, progress=False)
    assert cnn_path.stat().st_mtime_ns == written  # moved to another machine, the store is still up to date here

    report = _probe_and_report(image_tree, tmp_path)
    section = report.split("## Environment")[1].split("\n## ")[0]
    with FeatureStore(hog_path) as store:
        hog = store.run["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in sorted(hog["versions"].items()))
    assert (f"| hog | {md(hog['host'])} | {md(hog['cpu'])}, {hog['cores']} cores | {md(', '.join(hog['isa']) or '-')} | none | "
            f"{hog['keras_backend']} | {md(versions)} |") in section
    assert f"| keras-tiny | elsewhere | Another CPU, {hog['cores']} cores | - | NVIDIA H200 | " in section
    assert f"| color | {md(UNRECORDED)} | - | - | - | - | - |" in section
    assert "computed on 2 different machines" in section
    assert pd.read_csv(tmp_path / "results" / "shapes" / "results.csv")["features"].nunique() == 3  # every store was probed


def test_a_random_weights_store_is_shown_beside_its_pretrained_backbone_and_never_as_the_headline(tiny, image_tree, tmp_path):
    from classify.page import collect
    from classify.results import select_best

    dataset = load_dataset(f"folder:{image_tree}")
    features = tmp_path / "features"
    pretrained = CNNFeaturizer(tiny, batch_size=8)
    control = CNNFeaturizer(tiny, batch_size=8, weights="random")
    control.name = "control"  # its own store; the report knows it by its fingerprint, whatever it is named
    for featurizer in (pretrained, control):
        extract_to_store(dataset, featurizer, store_path(features, dataset, featurizer), progress=False)
    report = _probe_and_report(image_tree, tmp_path)

    rows = pd.read_csv(tmp_path / "results" / "shapes" / "results.csv")
    trained, untrained = (select_best(rows[rows["features"] == name]) for name in ("keras-tiny", "control"))
    # The control has the higher CV score here: chosen among every row, it would be the headline.
    assert untrained["cv_score"] > trained["cv_score"] and select_best(rows)["features"] == "control"
    assert (f"Best by cross-validation on the training data: **keras-tiny / {trained['layer']} / {trained['classifier']}** "
            f"(CV {100 * trained['cv_score']:.2f}%, the highest of {int((rows['features'] == 'keras-tiny').sum())} candidates)") in report
    section = report.split("## Pretrained vs random weights")[1].split("\n## ")[0]
    assert (f"| keras-tiny | keras-tiny / {trained['layer']} / {trained['classifier']} | {100 * trained['top1']:.2f} | "
            f"control / {untrained['layer']} / {untrained['classifier']} | {100 * untrained['top1']:.2f} | "
            f"{100 * (trained['top1'] - untrained['top1']):+.2f} |") in section
    assert collect(tmp_path / "results" / "shapes", tmp_path / "reports" / "shapes", features_dir=features).best["features"] == "keras-tiny"
