"""reports/<dataset>/index.html: its parts, checked in the file, and its behaviour, checked in a real
browser (Debian's Chromium driven by Selenium, headless, from file://). The projector files.

The planted dataset: three classes of random circles and squares that differ only in colour:
blue, red, and a red so close to it that the probes confuse the two. Colour histograms separate
blue from the rest; HOG (on grey levels, normalised per block) does not. The class names carry
HTML, Markdown and quotes, which must show as text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, WITHOUT_TENSORFLOW, make_image_tree

from classify.embed import StoreEmbedding, embeddings_path, nearest_neighbours
from classify.page import write_page
from classify.thumbnails import ImageSource, thumb_name

XSS = '<img src=x onerror="window.pwned=1">'
CLASSES = {XSS: (200, 40, 40), "blue | *shape* 'q'": (40, 40, 200), 'red\'s "twin"': (185, 40, 60)}
BLUE = 1
BROWSER_MISSING = "no Chromium here: install it with `make browser` (as root: apt-get install chromium chromium-driver)"


def _classify(*args) -> None:
    from classify.cli import main

    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted dataset through baselines, probes, t-SNE and the report: (dataset spec, report folder, results folder)."""
    from baselines.__main__ import run_baselines
    from extract.datasets import load_dataset

    base = tmp_path_factory.mktemp("page")
    tree = make_image_tree(base / "planted", colours=CLASSES, per_class={"train": 20, "test": 12}, size=40, background=(25, 35))
    spec = f"folder:{tree}"
    run_baselines(load_dataset(spec), ["hog", "color"], features_dir=base / "features", processes=0, progress=False)
    dirs = ["--dataset", spec, "--features-dir", str(base / "features"), "--results-dir", str(base / "results"),
            "--reports-dir", str(base / "reports")]
    _classify("probe", *dirs, "--cs", "0.01,1", "--no-progress")
    _classify("tsne", *dirs, "--n", "72", "--no-progress")
    _classify("report", *dirs)
    return spec, base / "reports" / "planted", base / "results" / "planted"


def page_data(page: Path) -> dict:
    text = page.read_text()
    found = re.search(r'<script type="application/json" id="offshelf-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def test_nearest_neighbours_leave_each_row_out_even_beside_its_duplicate():
    X = np.array([[0.0], [0.0], [1.0], [3.0], [7.0]])  # rows 0 and 1 are the same point
    found = nearest_neighbours(X, 2)
    assert found.shape == (5, 2)
    assert all(i not in row for i, row in enumerate(found))
    assert found[0].tolist() == [1, 2] and found[1].tolist() == [0, 2] and found[4].tolist() == [3, 2]


def test_page_holds_every_layer_over_the_same_images_and_its_thumbnails(planted):
    spec, reports, results = planted
    page = reports / "index.html"
    text = page.read_text()
    data = page_data(page)
    view = data["embedding"]
    assert [layer["name"] for layer in view["layers"]] == ["color / hsv256", "hog / hog"]  # every store's taps, the CV choice first found
    assert view["layers"][view["selected"]]["name"] == "color / hsv256"  # the layer chosen by CV is shown first
    images = view["images"]
    assert len(images["path"]) == 72 and set(images["split"]) == {"train", "test"}
    for layer in view["layers"]:  # the same images in every layer, each with k neighbours among them
        assert None not in layer["x"] and len(layer["x"]) == len(images["path"])
        assert all(len(near) == data["k"] == 8 and i not in near for i, near in enumerate(layer["neighbours"]))
        predicted = np.asarray(layer["predicted"])
        assert (predicted[np.asarray(images["split"]) == "test"] >= 0).all() and (predicted[np.asarray(images["split"]) == "train"] == -1).all()
    for thumb in images["thumb"] + re.findall(r'<img src="(thumbs/[0-9a-f]+\.jpg)"', text):
        assert (reports / thumb).is_file(), thumb
    # offline: no script, style or image from anywhere but the page and its folder
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', text)
    # class names as text: escaped in the HTML, \u003c in the JSON, never a tag
    assert XSS not in text and "&lt;img src=x onerror=&quot;window.pwned=1&quot;&gt;" in text
    assert view["classes"][0] == XSS
    assert "[index.html](index.html)" in (reports / "report.md").read_text()


def test_accuracy_chart_takes_each_layers_best_cv_row_and_draws_fused_layers_as_lines():
    from classify.page import accuracy_data
    from classify.results import RESULT_COLUMNS, select_best

    def row(features, kind, layer, depth, normalization, cv, top1):
        return {**{c: 0 for c in RESULT_COLUMNS}, "dataset": "d", "features": features, "kind": kind, "layer": layer, "layer_depth": depth,
                "classifier": "logreg", "protocol": "given", "normalization": normalization, "C": 1.0, "cv_score": cv, "top1": top1,
                "mean_per_class_acc": top1, "mAP": np.nan}

    rows = pd.DataFrame([row("efficientnet_lite0", "cnn", "stem", 0, "standard", 0.5, 0.52), row("efficientnet_lite0", "cnn", "stem", 0, "l2", 0.6, 0.40),
                         row("efficientnet_lite0", "cnn", "pre_logits", 1, "standard", 0.9, 0.88), row("efficientnet_lite0", "cnn", "pre_logits", 1, "l2", 0.8, 0.95),
                         row("efficientnet_lite0", "cnn", "stage6+pre_logits", 2, "standard", 0.92, 0.90), row("hog", "baseline", "hog", 0, "standard", 0.7, 0.7)],
                        columns=RESULT_COLUMNS)
    chart = accuracy_data(rows, "top1", select_best(rows))
    curve, = chart["curves"]
    assert chart["ticks"] == ["stem", "pre_logits"] and curve["data"]["x"] == [0.0, 1.0]
    assert curve["data"]["y"] == [40.0, 88.0]  # per layer the best CV score's row, never the best test score's
    assert curve["data"]["classifier"] == ["logreg (l2)", "logreg (standard)"]
    assert [line["name"] for line in chart["lines"]] == ["efficientnet_lite0 / stage6+pre_logits: 90.0%", "hog / hog: 70.0%"]
    assert chart["chosen"]["name"] == ["efficientnet_lite0 / stage6+pre_logits"] and chart["chosen"]["cv"] == ["92.00%"]


def test_page_leaves_out_embeddings_of_a_rebuilt_store(planted, tmp_path):
    spec, reports, results = planted
    copy = tmp_path / "results" / "planted"
    shutil.copytree(results, copy)
    stale = StoreEmbedding.load(embeddings_path(copy, "hog"))
    stale.fingerprint_id = "000000000000"  # as if hog.h5 had been rebuilt with other settings since `make tsne`
    stale.save(embeddings_path(copy, "hog"))
    page = write_page(copy, tmp_path / "reports" / "planted", features_dir=reports.parents[1] / "features",
                      images=ImageSource(spec))
    assert [layer["name"] for layer in page_data(page)["embedding"]["layers"]] == ["color / hsv256"]


def test_thumbnails_are_written_once(planted, tmp_path):
    spec, reports, results = planted
    before = {p: p.stat().st_mtime_ns for p in (reports / "thumbs").iterdir()}
    write_page(results, reports, features_dir=reports.parents[1] / "features", images=ImageSource(f"folder:{tmp_path / 'gone'}"))
    assert {p: p.stat().st_mtime_ns for p in (reports / "thumbs").iterdir()} == before  # the dataset was not even needed


def test_projector_files_without_tensorflow(planted):
    spec, reports, results = planted
    features_dir = reports.parents[1] / "features"
    script = WITHOUT_TENSORFLOW + (
        "from classify.cli import main\n"
        f"code = main(['projector', '--dataset', {spec!r}, '--features-dir', {str(features_dir)!r}, '--reports-dir', {str(reports.parent)!r},"
        " '--features', 'color', '--layer', 'hsv256', '--n', '30'])\n"
        "assert 'tensorflow' not in sys.modules\n"
        "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = reports / "projector" / "color__hsv256"
    tensors = np.loadtxt(out / "tensors.tsv", delimiter="\t")
    metadata = pd.read_csv(out / "metadata.tsv", sep="\t", dtype=str, quoting=3)
    assert tensors.shape == (30, 256) and list(metadata.columns) == ["class", "split", "path"] and len(metadata) == 30
    assert set(metadata["class"]) == set(CLASSES)
    assert all(Path(p).parts[1] == c for p, c in zip(metadata["path"], metadata["class"]))  # each row's class is its folder's
    with Image.open(out / "sprite.png") as sheet:
        assert sheet.size == (6 * 64, 5 * 64)  # ceil(sqrt(30)) = 6 columns
    config = (out / "projector_config.pbtxt").read_text()
    assert 'tensor_path: "tensors.tsv"' in config and 'metadata_path: "metadata.tsv"' in config and "single_image_dim: 64" in config
    assert json.loads((out / "projector_config.json").read_text())["embeddings"][0]["tensorShape"] == [30, 256]


# --- in the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(BROWSER_MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


# How long an event may take to show under a loaded machine (the suite's other processes): a wait, not a claim.
WAIT_SECONDS = 20


class Page:
    """One opened page: its load time, and the pointer moved as a person would move it."""

    def __init__(self, browser, path: Path, shots: Path):
        self.browser, self.shots = browser, shots
        browser.get_log("browser"), browser.get_log("performance")  # what earlier pages left
        started = time.perf_counter()
        browser.get(path.resolve().as_uri())
        while not browser.execute_script("return Boolean(window.offshelf && window.offshelf.ready)"):
            assert time.perf_counter() - started < 30, "the page never became ready"
            time.sleep(0.02)
        self.seconds = time.perf_counter() - started

    def js(self, code: str, *args):
        return self.browser.execute_script(code, *args)

    def pointer_to(self, x: float, y: float) -> None:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        action = ActionBuilder(self.browser)
        action.pointer_action.move_to_location(int(round(x)), int(round(y)))
        action.perform()

    def hover(self, i: int) -> dict:
        self.js("document.getElementById('scatter-box').scrollIntoView()")
        self.pointer_to(*self.js("return offshelf.pointClient(arguments[0])", i))
        deadline = time.perf_counter() + WAIT_SECONDS
        while True:
            tip = self.js("""const tip = document.getElementById('tooltip'), image = tip.querySelector('img');
                return {hidden: tip.hidden, index: Number(tip.dataset.index), cls: tip.querySelector('.tip-class').textContent,
                        split: tip.querySelector('.tip-split').textContent, prediction: tip.querySelector('.tip-prediction').textContent,
                        src: image.getAttribute('src'), width: image.naturalWidth, complete: image.complete}""")
            if (not tip["hidden"] and tip["complete"]) or time.perf_counter() > deadline:
                return tip
            time.sleep(0.05)

    def click(self, i: int) -> list[dict]:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        self.hover(i)
        time.sleep(0.35)  # a person's pace: two clicks closer in time are a double tap to Bokeh
        action = ActionBuilder(self.browser)
        action.pointer_action.click()
        action.perform()
        return self.loaded("#neighbours figure", "index: Number(f.dataset.index), kind: f.className, label: f.dataset.label")

    def loaded(self, figures: str, fields: str) -> list[dict]:
        """``fields`` of each of the ``figures`` (a CSS selector; ``f`` in ``fields``) and their image's width, once every image has loaded."""
        deadline = time.perf_counter() + WAIT_SECONDS
        while not self.js(f"return [...document.querySelectorAll({figures!r})].every(f => f.querySelector('img').complete)"):
            assert time.perf_counter() < deadline, f"the images of {figures} never loaded"
            time.sleep(0.05)
        return self.js(f"return [...document.querySelectorAll({figures!r})].map(f => ({{{fields}, width: f.querySelector('img').naturalWidth}}))")

    def choose_layer(self, name: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(self.browser.find_element(By.ID, "layer-select")).select_by_visible_text(name)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.browser.save_screenshot(str(path))
        return path

    def problems(self) -> tuple[list, list]:
        """Severe messages of the browser's log, and every request for anything but a file or inline data."""
        errors = [e["message"] for e in self.browser.get_log("browser") if e["level"] == "SEVERE"]
        urls = [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in self.browser.get_log("performance")
                if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
        return errors + self.js("return offshelf.errors"), [u for u in urls if not u.startswith(("file:", "data:", "blob:"))]


def _colour(file: Path) -> np.ndarray:
    """The mean colour of a thumbnail's shape (its bright pixels)."""
    pixels = np.asarray(Image.open(file).convert("RGB"), float).reshape(-1, 3)
    return pixels[pixels.max(axis=1) > 120].mean(axis=0)


def test_browser_hover_click_layers_and_confusions(planted, browser, tmp_path):
    spec, reports, results = planted
    page = Page(browser, reports / "index.html", tmp_path)
    data = page_data(reports / "index.html")["embedding"]
    labels, classes = np.asarray(data["images"]["label"]), data["classes"]
    assert page.seconds < 10
    page.shot("loaded")

    # hover: the tooltip shows that point's image (loaded), its class as text, its split and the probe's verdict
    test_point = int(np.flatnonzero(np.asarray(data["images"]["split"]) == "test")[0])
    tip = page.hover(test_point)
    page.shot("hover")
    assert not tip["hidden"] and tip["index"] == test_point and tip["width"] > 0
    assert tip["cls"] == classes[labels[test_point]] and tip["split"] == "split: test" and "probe: " in tip["prediction"]
    assert tip["src"] == thumb_name(data["images"]["path"][test_point])
    shape = _colour(reports / tip["src"])  # the image is of the class named: its colour is the class's
    assert np.abs(shape - CLASSES[tip["cls"]]).max() < 40
    train_point = int(np.flatnonzero(np.asarray(data["images"]["split"]) == "train")[0])
    assert page.hover(train_point)["prediction"] == "training image: the probe was fitted on it"

    # click at the colour layer: k neighbours, loaded, nine in ten blue for blue images; at HOG (blind to colour) about chance
    blues = np.flatnonzero(labels == BLUE)[:6]
    same = {}
    for name in ("color / hsv256", "hog / hog"):
        page.choose_layer(name)
        found = [page.click(int(i)) for i in blues]
        page.shot(f"neighbours {name.replace(' / ', '_')}")
        assert all(len(f) == 9 and f[0]["kind"] == "thumb query" and f[0]["index"] == i and all(n["width"] > 0 for n in f)
                   for i, f in zip(blues, found))
        same[name] = np.mean([n["label"] == classes[BLUE] for f in found for n in f[1:]])
    assert same["color / hsv256"] >= 0.9 and same["hog / hog"] < 0.5, same  # chance: 1/3

    # switching the layer moves the points and keeps the images
    page.choose_layer("color / hsv256")
    before = [page.js("return offshelf.pointClient(arguments[0])", i) for i in range(5)]
    src = page.hover(4)["src"]
    page.choose_layer("hog / hog")
    after = [page.js("return offshelf.pointClient(arguments[0])", i) for i in range(5)]
    assert np.abs(np.subtract(before, after)).max() > 20
    assert page.hover(4)["src"] == src
    page.shot("switched")

    # the confusion strips show test images of the two classes they name, predicted as the strip says
    page.js("document.getElementById('pairs').scrollIntoView()")
    page.shot("confusions")
    strips = page.js("""return [...document.querySelectorAll('.pair')].map(pair => ({a: pair.dataset.a, b: pair.dataset.b,
        strips: [...pair.querySelectorAll('.strip')].map(s => ({true: s.dataset.true, predicted: s.dataset.predicted,
            images: [...s.querySelectorAll('figure')].map(f => ({path: f.dataset.path, width: f.querySelector('img').naturalWidth}))}))}))""")
    assert strips and strips[0]["strips"]
    predictions = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in (results / "predictions").rglob("*.csv")])
    for pair in strips:
        for strip in pair["strips"]:
            assert {strip["true"], strip["predicted"]} == {pair["a"], pair["b"]}
            for image in strip["images"]:
                assert Path(image["path"]).parts[:2] == ("test", strip["true"])  # a test image of the true class's folder
                assert ((predictions["path"] == image["path"]) & (predictions["predicted"] == strip["predicted"])).any()
    assert {pair["a"] for pair in strips} | {pair["b"] for pair in strips} >= {XSS, 'red\'s "twin"'}

    # the table sorts and filters; class names stayed text throughout
    page.js("document.querySelector('#per-class th:nth-child(4)').click()")
    accuracy = page.js("return [...document.querySelectorAll('#per-class tbody tr')].map(r => Number(r.cells[3].dataset.value))")
    assert accuracy == sorted(accuracy)
    page.js("const f = document.getElementById('class-filter'); f.value = 'twin'; f.dispatchEvent(new Event('input'))")
    assert page.js("return [...document.querySelectorAll('#per-class tbody tr')].filter(r => !r.hidden).map(r => r.cells[0].textContent)") == ['red\'s "twin"']
    legend = page.js("return [...document.querySelectorAll('.legend-name')].map(n => n.textContent)")
    assert legend == list(CLASSES) and page.js("return typeof window.pwned") == "undefined"
    errors, requests = page.problems()
    assert errors == [] and requests == []


def test_legend_hides_a_class(planted, browser, tmp_path):
    spec, reports, results = planted
    page = Page(browser, reports / "index.html", tmp_path)
    labels = np.asarray(page_data(reports / "index.html")["embedding"]["images"]["label"])
    blue = int(np.flatnonzero(labels == BLUE)[0])
    page.js(f"document.querySelector('.legend-item[data-class=\"{BLUE}\"]').click()")
    tip = page.hover(blue)
    assert tip["hidden"] or tip["index"] != blue  # nothing to hover where the blue point was
    page.shot("blue hidden")
    page.js(f"document.querySelector('.legend-item[data-class=\"{BLUE}\"]').click()")
    assert page.hover(blue)["index"] == blue


@pytest.mark.slow
def test_page_of_500_classes_and_a_layer_of_40000_values_opens_in_seconds(browser, tmp_path):
    """A dataset of 500 classes (two images each), a 40,000-value layer embedded by `make tsne`'s
    code; results and predictions are written here (a stand-in probe that takes the first 100
    classes' test images for the next class), since fitting 500-class probes on 40,000 values is not
    what this checks."""
    from classify.embed import embed_stores
    from classify.evaluate import store_fingerprint_id
    from classify.results import PROBES_VERSION, RESULT_COLUMNS, write_predictions
    from extract.datasets import load_dataset
    from extract.store import StoreWriter

    names = {f"class {i:03d}": tuple(int(v) for v in np.random.default_rng(i).integers(40, 255, 3)) for i in range(500)}
    tree = make_image_tree(tmp_path / "many", colours=names, per_class={"train": 1, "test": 1}, size=24)
    dataset = load_dataset(f"folder:{tree}")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(500, 40_000)).astype(np.float32)
    features = (centres[dataset.labels] + rng.normal(size=(len(dataset), 40_000)).astype(np.float32)).round(1)
    store = tmp_path / "features" / "many" / "wide.h5"
    with StoreWriter(store, dataset=dataset, extractor="wide", fingerprint={"wide": 1}, taps=["wide"]) as writer:
        writer.write_shard(np.arange(len(dataset)), {"wide": features})
        writer.finalize()
    started = time.perf_counter()
    embed_stores([store], out_dir=tmp_path / "results" / "many", report_dir=tmp_path / "reports" / "many", progress=False)
    tsne_seconds = time.perf_counter() - started
    test = np.asarray(dataset.splits) == "test"
    predicted = np.where(dataset.labels < 100, dataset.labels + 1, dataset.labels)[test]
    row = {**{c: 0 for c in RESULT_COLUMNS}, "probe_version": PROBES_VERSION, "dataset": "many", "features": "wide", "kind": "cnn", "layer": "wide", "classifier": "logreg",
           "protocol": "given", "normalization": "standard", "C": 1.0, "cv_score": 0.8, "top1": float(np.mean(predicted == dataset.labels[test])),
           "mean_per_class_acc": 0.8, "mAP": np.nan, "n_train": 500, "n_test": 500,
           "store_fingerprint": store_fingerprint_id({"wide": 1}, dataset.digest())}
    pd.DataFrame([row], columns=RESULT_COLUMNS).to_csv(tmp_path / "results" / "many" / "results.csv", index=False)
    classes = np.asarray(dataset.classes)
    write_predictions(tmp_path / "results" / "many", row, np.asarray(dataset.paths)[test], classes[dataset.labels[test]], classes[predicted])
    started = time.perf_counter()
    page = write_page(tmp_path / "results" / "many", tmp_path / "reports" / "many", features_dir=tmp_path / "features",
                      images=ImageSource(f"folder:{tree}"))
    write_seconds = time.perf_counter() - started
    opened = Page(browser, page, tmp_path)
    opened.shot("500 classes")
    print(f"500 classes, 40,000 values: make tsne's embedding {tsne_seconds:.1f} s, page written in {write_seconds:.1f} s "
          f"({page.stat().st_size / 1e6:.2f} MB), ready in the browser in {opened.seconds:.2f} s")
    assert opened.seconds < 5
    assert opened.js("return document.querySelectorAll('#per-class tbody tr').length") == 500
    assert opened.js("return document.querySelectorAll('.legend-item').length") == 500
    assert opened.js("return document.querySelectorAll('.pair').length") == 12
    assert opened.problems() == ([], [])
