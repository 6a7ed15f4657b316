"""Forged or inconsistent files are refused in one line each, and never read past their bounds
(issue #23, section 3): feature stores, saved probes, hand-edited results.csv, CSV datasets."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from classify.results import RESULT_COLUMNS
from extract.datasets.base import ImageDataset
from extract.store import FeatureStore, StoreError, StoreWriter

ROOT = Path(__file__).resolve().parents[1]
SECRET = np.full((12, 5), 1234.5, np.float32)  # what a forged store would read from another file


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def _one_line_error(result, *parts):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(part in last for part in parts), (last, parts)
    return last


# -- stores -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A small real store: 12 images of 2 classes, one layer of 5 values."""
    folder = tmp_path_factory.mktemp("genuine")
    labels = np.array([0, 1] * 6)
    dataset = ImageDataset("shapes", ("a", "b"), tuple(f"{i}.png" for i in range(12)), labels,
                           tuple(["train"] * 8 + ["test"] * 4), read=None)
    features = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32) + labels[:, None]
    with StoreWriter(folder / "features" / "shapes" / "forged.h5", dataset=dataset, extractor="forged",
                     fingerprint={"baseline": "forged"}, taps=["x"]) as writer:
        writer.write_shard(np.arange(12), {"x": features})
        path = writer.finalize()
    with h5py.File(folder / "secret.h5", "w") as secret:
        secret["x"] = SECRET
    (folder / "secret.raw").write_bytes(SECRET.tobytes())
    return path


def _replace(f: h5py.File, name: str, make) -> None:
    del f[name]
    make(f, name)


def _virtual(f, name):
    layout = h5py.VirtualLayout(shape=SECRET.shape, dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(Path(f.filename).parent.parent.parent / "secret.h5"), "x", shape=SECRET.shape)
    f.create_virtual_dataset(name, layout)


FORGERIES = {
    "external link": (lambda f: _replace(f, "layers/x", lambda f, n: f.__setitem__(
        n, h5py.ExternalLink(str(Path(f.filename).parent.parent.parent / "secret.h5"), "x"))), "ExternalLink at /layers/x"),
    "soft link": (lambda f: f.__setitem__("layers/y", h5py.SoftLink("/layers/x")), "SoftLink at /layers/y"),
    "virtual dataset": (lambda f: _replace(f, "layers/x", _virtual), "virtual dataset at /layers/x"),
    "external raw storage": (lambda f: _replace(f, "layers/x", lambda f, n: f.create_dataset(
        n, shape=SECRET.shape, dtype=np.float32, external=[(str(Path(f.filename).parent.parent.parent / "secret.raw"), 0, SECRET.nbytes)])),
        "in external files"),
    "an unknown filter": (lambda f: _replace(f, "layers/x", lambda f, n: f.create_dataset(n, data=SECRET, compression="lzf")),
                          "filters /layers/x with [32000]"),
    "48 TiB declared": (lambda f: _replace(f, "layers/x", lambda f, n: f.create_dataset(
        n, shape=(12, 2**40), dtype=np.float32, chunks=(12, 1024))), "declares /layers/x of shape (12, 1099511627776)"),
    "labels out of range": (lambda f: f["index/label"].__setitem__(0, 7), "labels from 0 to 7 for 2 classes"),
    "an empty class list": (lambda f: _replace(f, "classes", lambda f, n: f.create_dataset(n, shape=(0,), dtype=h5py.string_dtype())),
                            "an empty class list"),
    "a short layer": (lambda f: _replace(f, "layers/x", lambda f, n: f.create_dataset(n, data=SECRET[:11])),
                      "layer 'x' of shape (11, 5) and dtype float32 for 12 images"),
    "a short split index": (lambda f: _replace(f, "index/split", lambda f, n: f.create_dataset(
        n, data=np.array(["train"] * 11, dtype=object), dtype=h5py.string_dtype())), "11 rows in index/split and 12 in index/label"),
    "a fingerprint that is not JSON": (lambda f: f.attrs.__setitem__("fingerprint", "{not json"), "fingerprint attribute that is not JSON"),
    "a tap naming a missing layer": (lambda f: f.attrs.__setitem__("taps", json.dumps(["x", "y"])), "lists tap 'y'"),
    "no extractor": (lambda f: f.attrs.__delitem__("extractor"), "no text attribute 'extractor'"),
    "labels edited": (lambda f: f["index/label"].__setitem__(slice(None), f["index/label"][()][::-1]), "whose digest"),
    "multi-label targets out of range": (lambda f: f.create_dataset("index/multilabel", data=np.full((12, 2), 3, np.int8)),
                                         "index/multilabel of shape (12, 2) and values outside"),
}


@pytest.mark.parametrize("kind", FORGERIES)
def test_a_forged_store_is_refused_in_one_line_and_never_read(genuine, tmp_path, kind):
    forge, expected = FORGERIES[kind]
    path = tmp_path / "features" / "shapes" / "forged.h5"
    path.parent.mkdir(parents=True)
    shutil.copy(genuine, path)
    with h5py.File(path, "r+") as f:
        forge(f)
    with pytest.raises(StoreError) as refused:
        FeatureStore(path, dataset="shapes")
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_the_genuine_store_reads_and_its_digest_is_checked(genuine):
    with FeatureStore(genuine, dataset="shapes") as store, h5py.File(genuine) as raw:
        assert len(store) == 12 and store.features("x").shape == (12, 5)
        assert raw.attrs["index_digest"] == raw.attrs["dataset_digest"]  # nothing skipped


def test_a_store_renamed_from_another_dataset_is_refused_by_classify_tsne_and_report(genuine, tmp_path, caplog):
    from classify.report.rows import read_stores

    features = tmp_path / "features"
    (features / "flowers").mkdir(parents=True)
    shutil.copy(genuine, features / "flowers" / "forged.h5")  # features of `shapes` under flowers/
    dirs = ["--dataset", "folder:/nowhere/flowers", "--features-dir", str(features), "--results-dir", str(tmp_path / "r"),
            "--reports-dir", str(tmp_path / "p")]
    _one_line_error(_cli("classify", "probe", *dirs, "--no-progress"), "holds features of dataset 'shapes', not 'flowers'")
    _one_line_error(_cli("classify", "tsne", *dirs, "--no-progress"), "holds features of dataset 'shapes', not 'flowers'")
    with caplog.at_level(logging.WARNING):
        assert read_stores(features, "flowers") == []
    assert "leaving" in caplog.text and "not 'flowers'" in caplog.text


def test_a_forged_store_is_one_line_through_classify(genuine, tmp_path):
    path = tmp_path / "features" / "shapes" / "forged.h5"
    path.parent.mkdir(parents=True)
    shutil.copy(genuine, path)
    with h5py.File(path, "r+") as f:
        FORGERIES["external link"][0](f)
    _one_line_error(_cli("classify", "probe", "--dataset", "folder:/nowhere/shapes", "--features-dir", str(tmp_path / "features"),
                         "--results-dir", str(tmp_path / "r"), "--no-progress"), str(path), "ExternalLink")


# -- saved probes for `classify predict` --------------------------------------------------------------

@pytest.fixture(scope="module")
def genuine_probe(genuine, tmp_path_factory) -> Path:
    from classify.persist import save_probe
    from classify.probe import LinearProbe

    with FeatureStore(genuine) as store:
        probe = LinearProbe(Cs=(1.0,)).fit(store.features("x"), store.labels)
        return save_probe(tmp_path_factory.mktemp("probe") / "x__logreg.npz", probe, class_names=store.classes, layer="x",
                          features=store.extractor, fingerprint=store.fingerprint)


def _huge_header(path: Path) -> None:
    """A probe whose coef member declares an 8 TiB array in a few bytes."""
    import zipfile

    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files if k != "coef"}
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "a") as archive, archive.open("coef.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 1)})
        member.write(b"\0" * 64)


def _edit(**changes):
    def forge(path: Path) -> None:
        with np.load(path) as saved:
            arrays = {k: saved[k] for k in saved.files}
        for key, value in changes.items():
            if value is None:
                del arrays[key]
            else:
                arrays[key] = value(arrays[key]) if callable(value) else value
        np.savez(path, **arrays)
    return forge


def _nan(array):
    array = array.astype(np.float64)
    array.flat[0] = np.nan
    return array


PROBE_FORGERIES = {
    "NaN weights": (_edit(coef=_nan), "coef that is not finite"),
    "an infinite intercept": (_edit(intercept=lambda a: a * np.inf), "intercept that is not finite"),
    "an intercept of the wrong length": (_edit(intercept=np.zeros(3)), "intercept of shape (3,) for 2 classes"),
    "a zero scale": (_edit(scale=lambda a: a * 0), "every scale positive"),
    "an unknown normalisation": (_edit(normalization="whiten"), "normalization 'whiten'"),
    "classes that do not match the weights": (_edit(classes=np.array(["a", "b", "c"])), "for 3 classes"),
    "a missing key": (_edit(coef=None), "lacks ['coef']"),
    "a dim that is not the weights'": (_edit(dim=6), "coef of shape (1, 5) for dim 6"),
    "a negative C": (_edit(C=-1.0), "not one positive number"),
    "a fingerprint that is not JSON": (_edit(fingerprint="{x"), "fingerprint that is not JSON"),
    "an 8 TiB header": (_huge_header, "declares shape (1099511627776, 1)"),
    "not a zip file": (lambda path: path.write_bytes(b"not a zip at all"), "is not a readable array file (BadZipFile"),
    "a truncated file": (lambda path: path.write_bytes(path.read_bytes()[:300]), "is not a readable array file"),
    "pickled objects": (lambda path: np.savez(path, **{**dict(np.load(path)), "classes": np.array([{"a": 1}, 2], dtype=object)}),
                        "holds Python objects"),
}


@pytest.mark.parametrize("kind", PROBE_FORGERIES)
def test_a_forged_probe_is_refused_in_one_line(genuine_probe, tmp_path, kind):
    from classify.persist import SavedProbe
    from extract.errors import UserError

    forge, expected = PROBE_FORGERIES[kind]
    path = tmp_path / "probe.npz"
    shutil.copy(genuine_probe, path)
    forge(path)
    with pytest.raises(UserError) as refused:
        SavedProbe.load(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_the_genuine_probe_predicts_and_a_forged_one_is_one_line_through_predict(genuine, genuine_probe, tmp_path):
    from classify.persist import SavedProbe

    probe = SavedProbe.load(genuine_probe)
    with FeatureStore(genuine) as store:
        assert np.mean(np.asarray(probe.predict(store.features("x"))) == np.asarray(store.classes)[store.labels]) > 0.8
    forged = tmp_path / "forged.npz"
    shutil.copy(genuine_probe, forged)
    PROBE_FORGERIES["NaN weights"][0](forged)
    out = tmp_path / "predicted.csv"
    _one_line_error(_cli("classify", "predict", "--probe", str(forged), "--store", str(genuine), "--out", str(out)), str(forged))
    assert not out.exists()


# -- results.csv edited by hand -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genuine_results(genuine, tmp_path_factory) -> Path:
    """results.csv of real probes (logistic regression and linear SVM) on the genuine store."""
    from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
    from classify.results import update_results

    out = tmp_path_factory.mktemp("results") / "shapes"
    rows = Evaluation(genuine, parse_protocol("given"), ProbeSettings(classifiers=("logreg", "svm"), Cs=(0.1, 1.0)), out_dir=out).run(progress=False)
    update_results(out / "results.csv", rows)
    return out / "results.csv"


def _edit_cell(text: str, row: int, column: str, value: str) -> str:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    rows[row][rows[0].index(column)] = value
    written = io.StringIO()
    csv.writer(written, lineterminator="\n").writerows(rows)
    return written.getvalue()


BAD_ROWS = {
    "garbage in C": (lambda t: _edit_cell(t, 2, "C", "lots"), "C='lots' is not a number"),
    "garbage in top1": (lambda t: _edit_cell(t, 2, "top1", "abc"), "top1='abc' is not a number"),
    "top1=7": (lambda t: _edit_cell(t, 2, "top1", "7"), "top1=7 is outside [0, 1]"),
    "an empty dataset cell": (lambda t: _edit_cell(t, 2, "dataset", ""), "dataset is empty"),
    "a ragged row": (lambda t: t.rstrip("\n") + ",extra,fields\n", f"{len(RESULT_COLUMNS) + 2} fields where the header has {len(RESULT_COLUMNS)}"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_of_results_csv_is_named_by_line_and_left_out(genuine_results, tmp_path, caplog, kind):
    from classify.report import write_report
    from classify.results import read_results

    edit, expected = BAD_ROWS[kind]
    path = tmp_path / "shapes" / "results.csv"
    path.parent.mkdir()
    path.write_text(edit(genuine_results.read_text()))
    with caplog.at_level(logging.WARNING, logger="classify.results"):
        results = read_results(path)
    assert f"{path}:3: {expected}; this row is left out" in caplog.text, caplog.text
    assert list(results["classifier"]) == ["logreg"]  # the svm row (line 3) is out, the other is read as it was
    report = write_report(path, tmp_path / "reports" / "shapes").read_text()
    assert "svm" not in report and "700" not in report


@pytest.mark.parametrize("column", ["dataset", "protocol", "top1"])
def test_results_csv_without_a_required_column_is_one_line(genuine_results, tmp_path, column):
    import pandas as pd

    path = tmp_path / "results" / "shapes" / "results.csv"
    path.parent.mkdir(parents=True)
    pd.read_csv(genuine_results).drop(columns=column).to_csv(path, index=False)
    args = ["classify", "report", "--dataset", "folder:/nowhere/shapes", "--results-dir", str(tmp_path / "results"),
            "--reports-dir", str(tmp_path / "reports")]
    _one_line_error(_cli(*args), str(path), f"lacks the column {column}")
    path.write_text("")
    _one_line_error(_cli(*args), str(path), "has no results")


# -- CSV datasets ---------------------------------------------------------------------------------------

@pytest.fixture
def listed_images(tmp_path) -> Path:
    """Six real PNGs in tmp_path/images, to list in CSVs."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


GOOD_ROWS = "images/0.png,a,train\nimages/1.png,b,train\nimages/2.png,a,test\nimages/3.png,b,test\n"


def _listing(folder: Path, body: bytes | str, name="list.csv") -> Path:
    path = folder / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


def test_a_csv_with_an_excel_byte_order_mark_reads_like_one_without(listed_images):
    from extract.datasets import load_dataset

    text = "path,label,split\n" + GOOD_ROWS
    plain = load_dataset("csv:" + str(_listing(listed_images, text)))
    marked = load_dataset("csv:" + str(_listing(listed_images, b"\xef\xbb\xbf" + text.encode(), "bom.csv")))
    assert marked.paths == plain.paths and marked.classes == ("a", "b") and marked.digest() == plain.digest()


def test_absolute_and_parent_paths_are_read_where_they_point(listed_images):
    from extract.datasets import load_dataset

    sub = listed_images / "lists"
    sub.mkdir()
    body = f"path,label,split\n{listed_images / 'images' / '0.png'},a,train\n../images/1.png,b,train\n../images/2.png,a,test\n../images/3.png,b,test\n"
    dataset = load_dataset(f"csv:{_listing(sub, body)}")
    assert dataset.read(0).shape == (8, 8, 3) and int(dataset.read(1)[0, 0, 0]) == 40  # images/1.png, through ..
    assert dataset.paths[0] == str(listed_images / "images" / "0.png")  # recorded as written


CSV_FAULTS = {
    "latin-1": (("path,label,split\n" + GOOD_ROWS + "images/4.png,caf\xe9,train\n").encode("latin-1"),
                "list.csv:6: byte 0xe9 is not UTF-8; save the file as UTF-8"),
    "extra fields": ("path,label,split\n" + GOOD_ROWS.replace("images/1.png,b,train", "images/1.png,b,train,oops"),
                     "list.csv:3: 4 fields where the header has 3"),
    "one image under two labels": ("path,label,split\n" + GOOD_ROWS + "images/0.png,b,train\n",
                                   "list.csv:6: 'images/0.png' (b, train) is the file 'images/0.png' of line 2 (a, train) again"),
    "one image in train and test by two paths": ("path,label,split\n" + GOOD_ROWS + "images/../images/1.png,b,test\n",
                                                 "list.csv:6: 'images/../images/1.png' (b, test) is the file 'images/1.png' of line 3"),
    "a header with an invisible character": ("path,label\u200b,split\n" + GOOD_ROWS, "header must be path,label[,split]. Received: 'path,label\\u200b,split'"),
}


@pytest.mark.parametrize("kind", CSV_FAULTS)
def test_a_faulty_csv_dataset_is_one_line_naming_file_and_line(listed_images, kind):
    from extract.datasets import load_dataset
    from extract.errors import UserError

    body, expected = CSV_FAULTS[kind]
    path = _listing(listed_images, body)
    with pytest.raises(UserError) as refused:
        load_dataset(f"csv:{path}")
    assert "\n" not in str(refused.value) and expected in str(refused.value), str(refused.value)


def test_the_same_file_by_absolute_and_relative_path_is_refused_through_the_cli(listed_images):
    path = _listing(listed_images, f"path,label,split\n{GOOD_ROWS}{listed_images / 'images' / '2.png'},a,train\n")
    _one_line_error(_cli("extract", "data-info", "--dataset", f"csv:{path}", "--no-check"), "list.csv:6:", "of line 4 (a, test) again")
