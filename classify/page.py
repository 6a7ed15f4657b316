"""``reports/<dataset>/index.html``: the embeddings of every layer, image by image, offline.

The page opens from the file system with nothing fetched: BokehJS (the JavaScript that Bokeh's
PyPI wheel ships, read from the installed package; Python's Bokeh is not imported) is inlined and
draws the plots in the browser from the page's own JSON; the thumbnails lie beside the page in
``thumbs/``. What it shows:

* every layer of every store (CNN taps low to high, then the baselines) as a 2-D t-SNE of the
  same sample of images (``make tsne`` computed it, ``classify.embed``), one layer at a time;
  colour by class, the legend toggles classes;
* hover: the image, its class, its split and, for test images, the prediction of that layer's
  probe (the classifier chosen by CV); training images have none: the probe was fitted on them;
* click: the image's k nearest images in that layer's standardised features (not in the
  picture), computed by ``make tsne`` and stored with the embedding;
* accuracy by layer, each point's CV score, test scores and C on hover, the CV choice marked;
* the chosen probe's confusions: the most-confused class pairs with their misclassified test
  images, a sortable and filterable per-class table, the matrix as a heat map.

Every class name and path reaches the page as text (escaped, or set as ``textContent``), never
as markup. ``explorer_iframe`` shows the embedding view in a notebook with the same code.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from classify.embed import EMBEDDING_VERSION, NEIGHBOURS, StoreEmbedding, embeddings_path
from classify.results import PROBE_KINDS, best_per, live_rows, read_predictions, read_results, select_best
from classify.thumbnails import ImageSource, data_uri, ensure_thumbnails, thumb_name
from extract.errors import UserError

log = logging.getLogger(__name__)

PAGE = "index.html"
ASSETS = Path(__file__).with_name("page_assets")
PAIRS = 12  # most-confused class pairs shown
STRIP = 6  # misclassified test images per direction of a pair
TEN = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
TWENTY = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
          "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")
METRICS = {"top1": "test top-1", "mAP": "test mAP"}
BOKEH_JS = ("bokeh.min.js", "bokeh-api.min.js")  # the core and its plotting API: what the page's script uses


def class_colours(n: int) -> list[str]:
    """matplotlib's tab10 / tab20 (as the PNGs), else hues around the circle by the golden angle."""
    if n <= len(TEN):
        return list(TEN[:n])
    if n <= len(TWENTY):
        return list(TWENTY[:n])
    import colorsys

    return ["#%02x%02x%02x" % tuple(int(255 * v) for v in colorsys.hls_to_rgb((i * 0.618034) % 1, 0.42 + 0.1 * (i % 3), 0.75))
            for i in range(n)]


def _percent(value) -> str:
    return f"{100 * value:.2f}%" if pd.notna(value) else "-"


def _unit_square(embedding: np.ndarray) -> np.ndarray:
    """Into the unit square, the same scale on both axes (t-SNE's units mean nothing)."""
    low, high = embedding.min(axis=0), embedding.max(axis=0)
    return (embedding - (low + high) / 2) / max(float((high - low).max()), 1e-12) + 0.5


def _nullable(values: np.ndarray) -> list:
    """A float array as a JSON list, NaN as null."""
    return [None if v != v else v for v in np.round(values, 4).tolist()]


def embedding_data(embeddings: list[StoreEmbedding], url) -> dict:
    """The page's images (the first store's sample) and every layer of every store over them,
    matched by image path: positions (null where a layer's sample lacks an image), each image's
    nearest neighbours, and (filled by ``attach_probes``) its probe's predictions (-1: none)."""
    first = embeddings[0]
    paths = [str(p) for p in first.paths]
    index = {path: i for i, path in enumerate(paths)}
    layers = []
    for embedding in embeddings:
        where = np.asarray([index.get(str(p), -1) for p in embedding.paths])
        kept = where >= 0
        for tap, (points, neighbours) in embedding.layers.items():
            xy = np.full((len(paths), 2), np.nan)
            xy[where[kept]] = _unit_square(np.asarray(points, np.float64))[kept]
            near: list[list[int]] = [[] for _ in paths]
            for row, found in zip(where[kept], where[np.asarray(neighbours)[kept]].tolist()):
                near[row] = [j for j in found if j >= 0]
            layers.append({"features": embedding.features, "layer": tap, "kind": embedding.kind, "name": f"{embedding.features} / {tap}",
                           "x": _nullable(xy[:, 0]), "y": _nullable(xy[:, 1]), "neighbours": near, "predicted": [-1] * len(paths),
                           "probe": "", "numbers": ""})
    classes = list(first.classes)
    return {"classes": classes, "colours": class_colours(len(classes)),
            "images": {"path": paths, "thumb": [url(p) for p in paths], "label": first.labels.tolist(), "split": [str(s) for s in first.splits]},
            "layers": layers, "selected": len(layers) - 1}


def _describe(record, metric: str) -> str:
    return (f"{record['classifier']} ({record['normalization']}), C={record['C']:g}, CV {_percent(record['cv_score'])}, "
            f"{METRICS.get(metric, metric)} {_percent(record[metric])}")


def attach_probes(view: dict, given: pd.DataFrame, results_dir: Path, metric: str) -> None:
    """Each layer's probe (of that features and layer, the row with the best CV score) and its
    predictions of the page's test images."""
    index = {path: i for i, path in enumerate(view["images"]["path"])}
    class_index = {name: i for i, name in enumerate(view["classes"])}
    probes = given[given["kind"].isin(PROBE_KINDS)]
    chosen = {} if probes.empty else {(r["features"], r["layer"]): r for _, r in best_per(probes, ["features", "layer"]).iterrows()}
    for layer in view["layers"]:
        record = chosen.get((layer["features"], layer["layer"]))
        if record is None:
            continue
        layer["probe"] = _describe(record, metric)
        frame = read_predictions(results_dir, record)
        if frame is None:
            continue
        for path, predicted in zip(frame["path"], frame["predicted"]):
            if path in index and predicted in class_index:
                layer["predicted"][index[path]] = class_index[predicted]


def attach_numbers(view: dict, layers_csv: Path) -> None:
    """Each layer's k-NN accuracy and silhouette, from layers.csv."""
    if not layers_csv.is_file():
        return
    table = pd.read_csv(layers_csv).drop_duplicates(["features", "layer"], keep="last").set_index(["features", "layer"])
    for layer in view["layers"]:
        if (layer["features"], layer["layer"]) in table.index:
            row = table.loc[(layer["features"], layer["layer"])]
            layer["numbers"] = (f"{int(row['knn_k'])}-NN {_percent(row['knn_acc_features'])} in the features, "
                                f"{_percent(row['knn_acc_tsne'])} in the picture; silhouette {row['silhouette']:.3f}")


def _tooltip_columns(frame: pd.DataFrame, x, metric: str) -> dict:
    return {"x": [float(v) for v in x], "y": [round(100 * float(v), 3) for v in frame[metric]],
            "name": (frame["features"].astype(str) + " / " + frame["layer"].astype(str)).tolist(),
            "classifier": (frame["classifier"].astype(str) + " (" + frame["normalization"].astype(str) + ")").tolist(),
            "C": [f"{c:g}" if pd.notna(c) else "-" for c in frame["C"]], "cv": [_percent(v) for v in frame["cv_score"]],
            "score": [_percent(v) for v in frame[metric]], "mean_per_class": [_percent(v) for v in frame["mean_per_class_acc"]]}


def accuracy_data(given: pd.DataFrame, metric: str, best) -> dict:
    """The accuracy-by-layer chart: per features and layer the row chosen by CV score (trained
    models as they are). CNN taps are curves; baselines, fused layers (``a+b``: no store layer, so no
    embedding either) and trained models are lines. Backbones with other taps share the axis by
    relative depth."""
    from classify.report.rows import chosen_per

    rows = chosen_per(given, ["features", "layer"])
    curve = (rows["kind"] == "cnn").to_numpy() & ~rows["layer"].astype(str).str.contains("+", regex=False).to_numpy()
    curves = rows[curve]
    tap_lists = {tuple(group.sort_values("layer_depth")["layer"].astype(str)) for _, group in curves.groupby("features")}
    shared = len(tap_lists) == 1
    chart = {"metric": METRICS.get(metric, metric), "ticks": list(next(iter(tap_lists))) if shared else None,
             "curves": [], "lines": [], "chosen": None}
    where = {}
    for features, group in curves.groupby("features", sort=True):
        group = group.sort_values("layer_depth")
        depth = group["layer_depth"].rank(method="dense").to_numpy() - 1
        x = depth if shared else depth / max(depth.max(), 1)
        where.update({(features, layer): float(v) for layer, v in zip(group["layer"], x)})
        chart["curves"].append({"name": f"{features} (layers)", "data": _tooltip_columns(group, x, metric)})
    right = max(where.values(), default=1.0) or 1.0
    for _, record in rows[~curve].sort_values(metric, ascending=False).iterrows():
        data = _tooltip_columns(record.to_frame().T, [0.0], metric)
        chart["lines"].append({"name": f"{record['features']} / {record['layer']}: {100 * record[metric]:.1f}%", "data": {**data, "x1": [right]}})
    if best is not None:
        at = rows[(rows["features"] == best["features"]) & (rows["layer"] == best["layer"])]
        if len(at):
            chart["chosen"] = _tooltip_columns(at.iloc[:1], [where.get((best["features"], best["layer"]), 0.0)], metric)
    return chart


@dataclass
class Confusions:
    probe: str
    classes: list[str]
    counts: np.ndarray  # (C, C): true class x predicted class
    pairs: list[dict]  # {"a", "b", "count", "strips": [(true, predicted, [paths])]}

    def heatmap(self) -> dict:
        """The matrix's non-zero cells, for the heat map."""
        true, predicted = np.nonzero(self.counts)
        totals = np.maximum(self.counts.sum(axis=1), 1)
        counts = self.counts[true, predicted]
        return {"classes": self.classes, "true": true.tolist(), "predicted": predicted.tolist(), "count": counts.tolist(),
                "rate": np.round(counts / totals[true], 4).tolist()}


def confusions(frame: pd.DataFrame, classes: list[str], probe: str) -> Confusions:
    """The most-confused class pairs (test images of one taken for the other, both directions),
    each with up to ``STRIP`` of those images per direction."""
    names = list(classes) + sorted((set(frame["label"]) | set(frame["predicted"])) - set(classes))
    index = {name: i for i, name in enumerate(names)}
    true = frame["label"].map(index).to_numpy()
    predicted = frame["predicted"].map(index).to_numpy()
    counts = np.zeros((len(names), len(names)), np.int64)
    np.add.at(counts, (true, predicted), 1)
    both = counts + counts.T
    upper = [(int(both[a, b]), int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(both, k=1)))]
    pairs = []
    for count, a, b in sorted(upper, key=lambda t: (-t[0], names[t[1]], names[t[2]]))[:PAIRS]:
        strips = [(t, p, frame["path"][(true == t) & (predicted == p)].tolist()[:STRIP]) for t, p in ((a, b), (b, a))]
        pairs.append({"a": a, "b": b, "count": count, "strips": [s for s in strips if s[2]]})
    return Confusions(probe, names, counts, pairs)


# --- HTML ------------------------------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _json_script(data) -> str:
    """JSON inside a <script> element: every ``<`` escaped, so no string in it can end the element."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _embedding_section(view: dict, k: int) -> str:
    classes, colours, labels = view["classes"], view["colours"], view["images"]["label"]
    counts = np.bincount(labels, minlength=len(classes))
    options = "".join(f'<option value="{i}"{" selected" if i == view["selected"] else ""}>{_e(layer["name"])}</option>'
                      for i, layer in enumerate(view["layers"]))
    legend = "".join(f'<button type="button" class="legend-item" data-class="{c}"><span class="swatch" style="background:{colours[c]}">'
                     f'</span><span class="legend-name">{_e(name)}</span><span class="legend-count">{counts[c]}</span></button>'
                     for c, name in enumerate(classes) if counts[c])
    return f"""
<section id="embedding">
  <h2>Every layer, image by image</h2>
  <p class="help">The same {len(labels)} images (a seeded, class-balanced sample) in every layer: a 2-D t-SNE of the layer's
  standardised features. Hover a point for its image, class and split, and for test images the prediction of that layer's
  probe (training images have none: the probe was fitted on them). Click it for its {k} nearest images in the layer's
  features (not in the picture). The legend toggles classes; the arrow keys step through the layers.</p>
  <div class="controls">
    <button type="button" id="layer-prev" title="lower layer">&#9664;</button>
    <select id="layer-select" aria-label="layer">{options}</select>
    <button type="button" id="layer-next" title="higher layer">&#9654;</button>
    <span id="layer-info"></span>
  </div>
  <div class="explorer">
    <div id="scatter-box"><div id="scatter-plot"></div>
      <div id="tooltip" class="tooltip" hidden><img alt=""><div class="tip-class"></div><div class="tip-split"></div><div class="tip-prediction"></div></div>
    </div>
    <div class="side">
      <div id="neighbours"><p class="hint">Click a point to see its {k} nearest images in this layer's features.</p></div>
      <aside id="legend">
        <div class="legend-tools"><button type="button" id="legend-all">all</button><button type="button" id="legend-none">none</button>
          <input id="legend-filter" type="search" placeholder="find a class" aria-label="find a class"></div>
        <div id="legend-items">{legend}</div>
      </aside>
    </div>
  </div>
</section>"""


def _strip(paths: list[str], url, true_name: str, predicted_name: str) -> str:
    caption = f"{true_name} taken for {predicted_name}"
    images = "".join(f'<figure class="thumb" data-path="{_e(p)}"><img src="{_e(url(p))}" alt="{_e(caption)}" loading="lazy"></figure>'
                     for p in paths)
    return (f'<div class="strip" data-true="{_e(true_name)}" data-predicted="{_e(predicted_name)}">'
            f'<div class="strip-caption">{_e(caption)} ({len(paths)} shown)</div>{images}</div>')


def _confusion_section(result: Confusions, url) -> str:
    names, counts = result.classes, result.counts
    pairs = []
    for pair in result.pairs:
        a, b = names[pair["a"]], names[pair["b"]]
        head = (f'<h4><span class="cls">{_e(a)}</span> &harr; <span class="cls">{_e(b)}</span>: {pair["count"]} test images '
                f'({counts[pair["a"], pair["b"]]} one way, {counts[pair["b"], pair["a"]]} the other)</h4>')
        strips = "".join(_strip(paths, url, names[t], names[p]) for t, p, paths in pair["strips"])
        pairs.append(f'<div class="pair" data-a="{_e(a)}" data-b="{_e(b)}">{head}{strips}</div>')
    totals = counts.sum(axis=1)
    off = counts - np.diag(np.diag(counts))
    rows = []
    for c in np.flatnonzero(totals):
        accuracy, worst = counts[c, c] / totals[c], int(np.argmax(off[c]))
        taken = names[worst] if off[c, worst] else ""
        rows.append(f'<tr><td data-value="{_e(names[c])}">{_e(names[c])}</td><td data-value="{totals[c]}">{totals[c]}</td>'
                    f'<td data-value="{counts[c, c]}">{counts[c, c]}</td><td data-value="{accuracy:.6f}">{100 * accuracy:.1f}</td>'
                    f'<td data-value="{_e(taken)}">{_e(taken) + f" ({off[c, worst]})" if taken else "-"}</td></tr>')
    return f"""
<section id="confusions">
  <h2>The chosen probe's confusions</h2>
  <p class="help">{_e(result.probe)}: its predictions of the test split. Pairs ranked by the test images of either class taken for the other.</p>
  <div id="pairs">{"".join(pairs) or "<p>No test image was misclassified.</p>"}</div>
  <h3>Per class</h3>
  <p><input id="class-filter" type="search" placeholder="filter classes" aria-label="filter classes"> Click a column to sort.</p>
  <table id="per-class"><thead><tr><th data-type="text">class</th><th data-type="number">test images</th><th data-type="number">right</th>
  <th data-type="number">accuracy %</th><th data-type="text">most often taken for</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
  <h3>Confusion matrix</h3>
  <p class="help">Rows: true class; columns: predicted class; colour: the fraction of the true class. Hover a cell for its classes and count.</p>
  <div id="heatmap-plot"></div>
</section>"""


_ACCURACY_SECTION = """
<section id="accuracy">
  <h2>Accuracy by layer</h2>
  <p class="help">CNN layers as curves; baselines, fused layers and trained models as lines; at each point the classifier with the
  best CV score. The star: the choice by cross-validation on the training data. Hover for CV score, test scores and C; click a
  legend entry to hide it.</p>
  <div id="accuracy-plot"></div>
</section>"""


def bokeh_js() -> str:
    """BokehJS as its wheel ships it: read from the installed package, without importing it."""
    spec = importlib.util.find_spec("bokeh")
    if spec is None or spec.origin is None:
        raise UserError("bokeh is not installed; run `make setup` (the page's plots are drawn by its BokehJS)")
    folder = Path(spec.origin).parent / "server" / "static" / "js"
    return "\n".join(f"<script>/* BokehJS {importlib.metadata.version('bokeh')}: {name} */\n{(folder / name).read_text()}</script>"
                     for name in BOKEH_JS)


def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


def render_page(*, title: str, header: str = "", embedding: dict | None = None, accuracy: dict | None = None,
                confusion: Confusions | None = None, url=lambda p: p, k: int = NEIGHBOURS) -> str:
    """The whole page as one HTML string; each section optional (a notebook cell shows the embedding alone)."""
    data = {"k": k, "embedding": embedding, "accuracy": accuracy, "heatmap": confusion.heatmap() if confusion else None}
    body = [header]
    if embedding is not None:
        body.append(_embedding_section(embedding, k))
    if accuracy is not None:
        body.append(_ACCURACY_SECTION)
    if confusion is not None:
        body.append(_confusion_section(confusion, url))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_asset("page.css")}</style>
{bokeh_js()}
</head><body>
{"".join(body)}
<script type="application/json" id="offshelf-data">{_json_script(data)}</script>
<script>{_asset("page.js")}</script>
</body></html>
"""


def _header(dataset: str, best, metric: str, report_dir: Path) -> str:
    links = [(name, label) for name, label in (("report.md", "the Markdown report"), ("accuracy_by_layer.png", "accuracy by layer (PNG)"),
                                               ("tsne_grid.png", "t-SNE grid (PNG)"), ("confusion_best.png", "confusion matrix (PNG)"))
             if (report_dir / name).is_file()]
    nav = " &middot; ".join(f'<a href="{_e(name)}">{_e(label)}</a>' for name, label in links)
    line = ""
    if best is not None:
        line = (f'<p class="headline">Best by cross-validation on the training data: <b>{_e(best["features"])} / {_e(best["layer"])} / '
                f'{_e(best["classifier"])}</b> (CV {_percent(best["cv_score"])}), {METRICS.get(metric, metric)} {_percent(best[metric])} '
                'on the test split.</p>')
    return f'<header><h1>{_e(dataset)}: the layers, image by image</h1>{line}<nav>{nav}</nav></header>'


def read_embeddings(results_dir: Path, stores: list[dict]) -> list[StoreEmbedding]:
    """The embeddings of the stores that still have the fingerprint they were computed from,
    CNN stores first, then the baselines."""
    found = []
    for store in sorted(stores, key=lambda s: ("baseline" in s["fingerprint"], s["extractor"])):
        embedding = StoreEmbedding.load(embeddings_path(results_dir, store["extractor"]))
        if embedding is None:
            continue
        if embedding.fingerprint_id != store["fingerprint_id"]:
            log.warning("%s was rebuilt since `make tsne`: its layers are left out of the page until `make tsne` runs again", store["extractor"])
            continue
        if embedding.version != EMBEDDING_VERSION:
            log.warning("%s's embeddings were made by other code (version %d, now %d): left out of the page until `make tsne` runs again",
                        store["extractor"], embedding.version, EMBEDDING_VERSION)
            continue
        embedding.layers = {tap: value for tap, value in embedding.layers.items() if tap in store["taps"]}
        if embedding.layers:
            found.append(embedding)
    return found


@dataclass
class PageParts:
    """What the page shows, before it is drawn."""

    dataset: str
    metric: str
    given: pd.DataFrame
    best: pd.Series | None
    view: dict | None
    confusion: Confusions | None

    def thumbnail_paths(self) -> list[str]:
        """The images the page shows: the embedding's sample and the confusion strips."""
        strips = [] if self.confusion is None else [p for pair in self.confusion.pairs for _, _, paths in pair["strips"] for p in paths]
        return ([] if self.view is None else self.view["images"]["path"]) + strips


def collect(results_dir: str | Path, report_dir: str | Path, *, features_dir: str | Path) -> PageParts:
    """The page's data from results.csv (rows of live stores), the stores' embeddings (``make tsne``)
    and the chosen probe's predictions."""
    from classify.recipe import chosen_among
    from classify.report.rows import describe, headline_rows, main_rows, read_stores

    results_dir, report_dir = Path(results_dir), Path(report_dir)
    results = read_results(results_dir / "results.csv")
    if results is None:
        raise FileNotFoundError(f"{results_dir / 'results.csv'} is missing; run `make classify` first")
    stores = read_stores(Path(features_dir), report_dir.name)
    results = live_rows(results, {s["extractor"]: s for s in stores})
    metric = "mAP" if results["mAP"].notna().any() else "top1"
    given = chosen_among(main_rows(results))  # the rows the report's headline is chosen among
    best = select_best(headline_rows(given, stores)) if len(given) else None  # the report's headline
    dataset = ", ".join(sorted(results["dataset"].astype(str).unique())) or report_dir.name
    embeddings = read_embeddings(results_dir, stores)
    if not embeddings:
        return PageParts(dataset, metric, given, best, None, None)
    view = embedding_data(embeddings, thumb_name)
    attach_probes(view, given, results_dir, metric)
    attach_numbers(view, results_dir / "layers.csv")
    names = [(layer["features"], layer["layer"]) for layer in view["layers"]]
    view["selected"] = (names.index((best["features"], best["layer"])) if best is not None and (best["features"], best["layer"]) in names
                        else max((i for i, layer in enumerate(view["layers"]) if layer["kind"] == "cnn"), default=0))
    frame = None if best is None else read_predictions(results_dir, best)
    confusion = None if frame is None else confusions(frame, view["classes"], describe(best))
    return PageParts(dataset, metric, given, best, view, confusion)


def write_page(results_dir: str | Path, report_dir: str | Path, *, features_dir: str | Path, images: ImageSource | None = None) -> Path:
    """Write ``report_dir/index.html``, and the thumbnails it lacks (``make tsne`` wrote those it knew of)."""
    started = time.perf_counter()
    report_dir = Path(report_dir)
    parts = collect(results_dir, report_dir, features_dir=features_dir)
    wanted = parts.thumbnail_paths()
    ensure_thumbnails(report_dir, wanted, images)
    text = render_page(title=f"{parts.dataset}: offshelf", header=_header(parts.dataset, parts.best, parts.metric, report_dir),
                       embedding=parts.view, accuracy=accuracy_data(parts.given, parts.metric, parts.best) if len(parts.given) else None,
                       confusion=parts.confusion, url=thumb_name)
    path = report_dir / PAGE
    path.write_text(text, encoding="utf-8")
    log.info("%s: %.0f KB, %d thumbnails, in %.2f s", path, path.stat().st_size / 1024, len(set(wanted)), time.perf_counter() - started)
    return path


def explorer_iframe(embeddings: list[StoreEmbedding], report_dir: Path, *, height: int = 1000):
    """The page's embedding view for a notebook cell: the same HTML and JavaScript, in an iframe,
    with the thumbnails of ``report_dir/thumbs/`` inlined as ``data:`` URIs."""
    from IPython.display import HTML

    view = embedding_data(embeddings, lambda path: data_uri(Path(report_dir) / thumb_name(path)))
    text = render_page(title="offshelf: embeddings", embedding=view)
    return HTML(f'<iframe srcdoc="{_e(text)}" style="width:100%;height:{height}px;border:0" title="offshelf embeddings"></iframe>')
