"""Which plotting library for the offline page: the same scatter of one layer's t-SNE sample, with an
image tooltip on hover, written three ways and opened from file:// in headless Chromium:

* ``bokehjs``: what ``classify.page`` does: BokehJS (from the bokeh wheel) inlined, the plot drawn
  in the browser from the page's JSON (``render_page`` with the embedding section only);
* ``bokeh``: Python Bokeh's figure with ``INLINE`` resources (``file_html``), the tooltip a CustomJS
  callback that fills an <img>;
* ``plotly``: Plotly's figure with ``include_plotlyjs=True`` (``to_html``), the tooltip a
  ``plotly_hover`` handler that fills an <img> (Plotly's own hover labels take no images).

Prints per variant the page's size, the seconds to write it (importing the library included, in
a fresh process that has imported what ``make report`` has), the milliseconds from navigation to the plot drawn (median of ``--repeats`` loads)
and whether a hover showed a loaded thumbnail. Plotly is not a project dependency: install it
beside the project (``pip install --target /tmp/plotly 'plotly==7.1.0'``) and pass
``PYTHONPATH=/tmp/plotly``.

    .venv/bin/python benchmarks/page_libraries.py [--results results/fashion-mnist --reports reports/fashion-mnist --features efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLTIP_DIV = '<div id="tip" style="position:fixed;display:none;background:#fff;border:1px solid #999;padding:4px"><img id="tipimg" width="96"></div>'

WRITERS = {
    "bokehjs": """
from classify.embed import StoreEmbedding
from classify.page import embedding_data, render_page
from classify.thumbnails import thumb_name
e = StoreEmbedding.load(EMBEDDING)
e.layers = dict([next(iter(e.layers.items()))])  # one layer, as the others
view = embedding_data([e], thumb_name)
OUT.write_text(render_page(title="bokehjs", embedding=view))
""",
    "bokeh": """
from bokeh.document import Document
from bokeh.embed import file_html
from bokeh.models import ColumnDataSource, CustomJS, HoverTool
from bokeh.plotting import figure
from bokeh.resources import INLINE
from classify.embed import StoreEmbedding
from classify.thumbnails import thumb_name
e = StoreEmbedding.load(EMBEDDING)
points, _ = next(iter(e.layers.values()))
source = ColumnDataSource({"x": points[:, 0], "y": points[:, 1], "thumb": [thumb_name(p) for p in e.paths]})
plot = figure(width=640, height=600, tools="pan,wheel_zoom,reset")
plot.scatter("x", "y", source=source, size=8)
plot.add_tools(HoverTool(tooltips=None, callback=CustomJS(args={"source": source}, code='''
  const hit = cb_data.index.indices; const tip = document.getElementById("tip");
  if (!hit.length) { tip.style.display = "none"; return; }
  document.getElementById("tipimg").src = source.data.thumb[hit[0]]; tip.style.display = "block";''')))
document = Document()
document.add_root(plot)
document.js_on_event("document_ready", CustomJS(code="window.READY = performance.now()"))
OUT.write_text(file_html(document, resources=INLINE, title="bokeh").replace("<body>", "<body>" + TOOLTIP_DIV))
""",
    "plotly": """
import plotly.graph_objects as go
from classify.embed import StoreEmbedding
from classify.thumbnails import thumb_name
e = StoreEmbedding.load(EMBEDDING)
points, _ = next(iter(e.layers.values()))
figure = go.Figure(go.Scatter(x=points[:, 0], y=points[:, 1], mode="markers", customdata=[thumb_name(p) for p in e.paths],
                              hoverinfo="none"), layout={"width": 640, "height": 600})
page = figure.to_html(include_plotlyjs=True, full_html=True, div_id="plot", post_script='''
  const gd = document.getElementById("plot"), tip = document.getElementById("tip");
  gd.on("plotly_hover", (ev) => { document.getElementById("tipimg").src = ev.points[0].customdata; tip.style.display = "block"; });
  gd.on("plotly_unhover", () => { tip.style.display = "none"; });
  window.READY = performance.now();''')
OUT.write_text(page.replace("<body>", "<body>" + TOOLTIP_DIV))
""",
}


# What `make report` has imported already when it writes the page: not counted.
PRELUDE = "import time\nfrom pathlib import Path\nimport numpy, pandas\nimport classify.embed, classify.report, classify.thumbnails\nstarted = time.perf_counter()\n"


def write(variant: str, embedding: Path, out: Path) -> float:
    """Seconds to import the library and write the page, in a fresh process that has imported what `make report` has."""
    script = PRELUDE + f"EMBEDDING = Path({str(embedding)!r})\nOUT = Path({str(out)!r})\nTOOLTIP_DIV = {TOOLTIP_DIV!r}\n"
    done = subprocess.run([sys.executable, "-c", script + WRITERS[variant] + "print(time.perf_counter() - started)"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant}: {done.stderr.strip().splitlines()[-1]}")
    return float(done.stdout.split()[-1])


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


READY = {"bokehjs": "window.offshelf && offshelf.ready ? offshelf.readyAt : null", "bokeh": "window.READY || null",
         "plotly": "window.READY || null"}
POINT = {  # the first point's pixel (client coordinates), from each plot's own scales
    "bokehjs": "return offshelf.pointClient(0)",
    "bokeh": """const view = [...Bokeh.index][0], r = view.canvas_view.el.getBoundingClientRect(), s = view.model.renderers[0].data_source.data;
                return [r.left + view.frame.x_scale.compute(s.x[0]), r.top + view.frame.y_scale.compute(s.y[0])]""",
    "plotly": """const gd = document.getElementById('plot'), r = gd.getBoundingClientRect(), l = gd._fullLayout, p = gd.calcdata[0][0];
                 return [r.left + l._size.l + l.xaxis.c2p(p.x), r.top + l._size.t + l.yaxis.c2p(p.y)]""",
}


def load(driver, page: Path, variant: str) -> float:
    driver.get(page.as_uri())
    deadline = time.perf_counter() + 60
    while (ready := driver.execute_script(f"return {READY[variant]}")) is None:
        if time.perf_counter() > deadline:
            raise SystemExit(f"{variant}: never ready")
        time.sleep(0.01)
    return float(ready)


def hover_shows_image(driver, variant: str) -> bool:
    """The pointer on the first point: does a loaded thumbnail show?"""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = driver.execute_script(POINT[variant])
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(int(x), int(y))
    action.perform()
    time.sleep(0.5)
    selector = "#tooltip img" if variant == "bokehjs" else "#tipimg"
    return driver.execute_script(f"const i = document.querySelector({selector!r}); return Boolean(i && i.complete && i.naturalWidth > 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/fashion-mnist")
    parser.add_argument("--reports", default="reports/fashion-mnist", help="where `make report` wrote thumbs/")
    parser.add_argument("--features", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from classify.embed import embeddings_path

    embedding = embeddings_path(Path(args.results), args.features).resolve()
    if not embedding.is_file():
        raise SystemExit(f"{embedding} is missing: run `make tsne` and `make report` first")
    driver = browser()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(Path(args.reports) / "thumbs", Path(folder) / "thumbs")  # beside the pages, as beside index.html
        for variant in WRITERS:
            page = Path(folder) / f"{variant}.html"
            seconds = write(variant, embedding, page)
            loads = [load(driver, page, variant) for _ in range(args.repeats)]
            rows.append({"variant": variant, "size MB": round(page.stat().st_size / 1e6, 2), "write s": round(seconds, 2),
                         "load ms (median)": round(statistics.median(loads)), "hover shows image": hover_shows_image(driver, variant)})
    driver.quit()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
