/* offshelf's page (classify/page.py): draws its plots with BokehJS from the page's JSON and wires
   the page's own elements to them: the layer selector, the legend, the image tooltip, the
   neighbours, the per-class table. Text from the data (class names, paths) is only ever set as
   textContent or shown by Bokeh's tooltips (which escape it), never as markup. */
(function () {
  "use strict";
  const page = JSON.parse(document.getElementById("offshelf-data").textContent);
  const data = Object.assign({k: page.k}, page.embedding || {});
  const api = {ready: false, readyAt: null, layer: null, selected: null, errors: []};
  window.offshelf = api;
  window.addEventListener("error", (event) => api.errors.push(String(event.message)));
  const plt = Bokeh.Plotting;
  const hidden = new Set();
  let scatterView = null;
  let source = null;

  function byId(id) { return document.getElementById(id); }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function className(i) { return data.classes[data.images.label[i]]; }

  function shown(i) {
    const layer = data.layers[api.layer];
    return layer.x[i] !== null && !hidden.has(data.images.label[i]);
  }

  function draw() {
    const layer = data.layers[api.layer];
    const n = data.images.label.length;
    const x = new Array(n);
    const y = new Array(n);
    for (let i = 0; i < n; i++) {
      x[i] = shown(i) ? layer.x[i] : NaN;
      y[i] = shown(i) ? layer.y[i] : NaN;
    }
    source.data = Object.assign({}, source.data, {x: x, y: y});
  }

  api.setLayer = function (i) {
    api.layer = Math.max(0, Math.min(data.layers.length - 1, i));
    byId("layer-select").value = String(api.layer);
    const layer = data.layers[api.layer];
    byId("layer-info").textContent = [layer.numbers, layer.probe ? "probe: " + layer.probe : "no probe of this layer on file"]
      .filter(Boolean).join(" \u00b7 ");
    draw();
    hideTip();
    if (api.selected !== null) showNeighbours(api.selected);
  };

  function prediction(i) {
    const layer = data.layers[api.layer];
    if (data.images.split[i] === "train") return ["", "training image: the probe was fitted on it"];
    const p = layer.predicted[i];
    if (p < 0) return ["", layer.probe ? "no prediction of this image on file" : "no probe of this layer on file"];
    const right = p === data.images.label[i];
    return [right ? "right" : "wrong", (right ? "\u2713 " : "\u2717 ") + "probe: " + data.classes[p]];
  }

  function canvasRect() { return scatterView.canvas_view.el.getBoundingClientRect(); }

  /* Where point i of the current layer is on the screen (client pixels), e.g. to point a mouse at it. */
  api.pointClient = function (i) {
    const layer = data.layers[api.layer];
    const rect = canvasRect();
    return [rect.left + scatterView.frame.x_scale.compute(layer.x[i]), rect.top + scatterView.frame.y_scale.compute(layer.y[i])];
  };

  function hideTip() { byId("tooltip").hidden = true; }

  function showTip(i, sx, sy) {
    const tip = byId("tooltip");
    const image = tip.querySelector("img");
    if (image.getAttribute("src") !== data.images.thumb[i]) image.src = data.images.thumb[i];
    tip.querySelector(".tip-class").textContent = className(i);
    tip.querySelector(".tip-split").textContent = "split: " + data.images.split[i];
    const [verdict, text] = prediction(i);
    const line = tip.querySelector(".tip-prediction");
    line.textContent = text;
    line.className = "tip-prediction " + verdict;
    tip.dataset.index = String(i);
    tip.hidden = false;
    const box = byId("scatter-box").getBoundingClientRect();
    const canvas = canvasRect();
    let left = canvas.left - box.left + sx + 16;
    let top = canvas.top - box.top + sy + 16;
    if (left + tip.offsetWidth > box.width) left -= tip.offsetWidth + 32;
    if (top + tip.offsetHeight > box.height) top -= tip.offsetHeight + 32;
    tip.style.left = Math.max(0, left) + "px";
    tip.style.top = Math.max(0, top) + "px";
  }

  /* Of the points under the pointer, the one nearest to it. */
  function nearest(hits, geometry) {
    const layer = data.layers[api.layer];
    const distance = (i) => (layer.x[i] - geometry.x) ** 2 + (layer.y[i] - geometry.y) ** 2;
    return hits.reduce((best, i) => (distance(i) < distance(best) ? i : best));
  }

  api.hover = function (cb) {
    const hits = cb.index.indices.filter(shown);
    if (!hits.length) { hideTip(); return; }
    showTip(nearest(hits, cb.geometry), cb.geometry.sx, cb.geometry.sy);
  };

  function thumb(i, kind) {
    const figure = element("figure", "thumb " + kind);
    figure.dataset.index = String(i);
    figure.dataset.label = className(i);
    const image = element("img");
    image.src = data.images.thumb[i];
    image.alt = className(i);
    figure.append(image, element("figcaption", "", className(i)));
    figure.title = data.images.path[i] + " (" + data.images.split[i] + ")";
    figure.addEventListener("click", () => api.select(i));
    return figure;
  }

  function showNeighbours(i) {
    const layer = data.layers[api.layer];
    const panel = byId("neighbours");
    panel.textContent = "";
    if (layer.x[i] === null) {
      panel.append(element("p", "hint", "This image is not in the sample of " + layer.name + "."));
      return;
    }
    const near = layer.neighbours[i].slice(0, data.k);
    const same = near.filter((j) => data.images.label[j] === data.images.label[i]).length;
    panel.append(element("h3", "", "The " + near.length + " nearest images in the features of " + layer.name));
    const strip = element("div", "strip");
    strip.append(thumb(i, "query"));
    for (const j of near) strip.append(thumb(j, data.images.label[j] === data.images.label[i] ? "same" : "other"));
    panel.append(strip, element("p", "hint", same + " of " + near.length + " of the same class as the clicked image (framed black); "
      + "green: same class, red: another. They are also highlighted in the picture."));
    source.selected.indices = [i].concat(near.filter(shown));
  }

  api.select = function (i) {
    api.selected = i;
    showNeighbours(i);
  };

  api.tap = function (cb) {
    const hits = source.selected.indices.filter(shown);
    const where = cb && cb.geometries;
    if (hits.length) api.select(where && where.x !== undefined ? nearest(hits, where) : hits[0]);
  };

  function syncLegend() {
    for (const item of document.querySelectorAll(".legend-item")) item.classList.toggle("off", hidden.has(Number(item.dataset.class)));
    draw();
  }

  function wireEmbedding() {
    byId("layer-select").addEventListener("change", (event) => api.setLayer(Number(event.target.value)));
    byId("layer-prev").addEventListener("click", () => api.setLayer(api.layer - 1));
    byId("layer-next").addEventListener("click", () => api.setLayer(api.layer + 1));
    document.addEventListener("keydown", (event) => {
      if (event.target.closest && event.target.closest("input, select, textarea")) return;
      if (event.key === "ArrowLeft") api.setLayer(api.layer - 1);
      if (event.key === "ArrowRight") api.setLayer(api.layer + 1);
    });
    for (const item of document.querySelectorAll(".legend-item")) {
      item.addEventListener("click", () => {
        const c = Number(item.dataset.class);
        if (hidden.has(c)) hidden.delete(c); else hidden.add(c);
        syncLegend();
      });
    }
    byId("legend-all").addEventListener("click", () => { hidden.clear(); syncLegend(); });
    byId("legend-none").addEventListener("click", () => { data.classes.forEach((_, c) => hidden.add(c)); syncLegend(); });
    byId("legend-filter").addEventListener("input", (event) => {
      const query = event.target.value.toLowerCase();
      for (const item of document.querySelectorAll(".legend-item")) {
        item.hidden = Boolean(query) && !item.querySelector(".legend-name").textContent.toLowerCase().includes(query);
      }
    });
    byId("scatter-box").addEventListener("mouseleave", hideTip);
  }

  function wireTable() {
    const table = byId("per-class");
    if (!table) return;
    const body = table.tBodies[0];
    table.querySelectorAll("th").forEach((header, column) => header.addEventListener("click", () => {
      const numeric = header.dataset.type === "number";
      const ascending = header.dataset.sorted !== "ascending";
      table.querySelectorAll("th").forEach((other) => delete other.dataset.sorted);
      header.dataset.sorted = ascending ? "ascending" : "descending";
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const x = a.cells[column].dataset.value;
        const y = b.cells[column].dataset.value;
        const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return ascending ? order : -order;
      });
      body.append(...rows);
    }));
    byId("class-filter").addEventListener("input", (event) => {
      const query = event.target.value.toLowerCase();
      for (const row of body.rows) row.hidden = Boolean(query) && !row.cells[0].dataset.value.toLowerCase().includes(query);
    });
  }

  function scatterPlot() {
    const n = data.images.label.length;
    source = new Bokeh.ColumnDataSource({data: {x: new Array(n).fill(NaN), y: new Array(n).fill(NaN),
      colour: data.images.label.map((c) => data.colours[c])}});
    const plot = plt.figure({width: 640, height: 600, x_range: new Bokeh.Range1d({start: -0.03, end: 1.03}),
      y_range: new Bokeh.Range1d({start: -0.03, end: 1.03}), tools: "pan,wheel_zoom,box_zoom,reset", toolbar_location: "above"});
    plot.xaxis.visible = false;
    plot.yaxis.visible = false;
    plot.grid.visible = false;
    plot.scatter({field: "x"}, {field: "y"}, {source: source, size: 8, fill_color: {field: "colour"}, line_color: {field: "colour"},
      fill_alpha: 0.8, selection_line_color: "black", selection_line_width: 1.5, nonselection_fill_alpha: 0.2, nonselection_line_alpha: 0.2});
    plot.add_tools(new Bokeh.HoverTool({tooltips: null, callback: {execute: (_, cb) => api.hover(cb)}}),
      new Bokeh.TapTool({mode: "replace", callback: {execute: (_, cb) => api.tap(cb)}}));
    return plt.show(plot, "#scatter-plot").then((view) => {
      scatterView = view;
      wireEmbedding();
      api.setLayer(data.selected);
    });
  }

  const TOOLTIPS = [["", "@name"], ["classifier", "@classifier"], ["C", "@C"], ["CV score", "@cv"], ["test", "@score"],
    ["mean per class", "@mean_per_class"]];
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  function accuracyPlot() {
    const chart = page.accuracy;
    const plot = plt.figure({width: 1000, height: 420, tools: "pan,wheel_zoom,reset,save", toolbar_location: "above",
      y_axis_label: chart.metric + " (%)",
      x_axis_label: chart.ticks ? "tapped layer (low to high)" : "relative depth of the tap in its network (0 lowest, 1 highest)"});
    if (chart.ticks) {
      plot.xaxis.ticker = new Bokeh.FixedTicker({ticks: chart.ticks.map((_, i) => i)});
      plot.xaxis.major_label_overrides = new Map(chart.ticks.map((name, i) => [i, name]));
      plot.xaxis.major_label_orientation = 0.5;
    }
    const items = [];
    const hovered = [];
    chart.curves.forEach((curve, i) => {
      const source = new Bokeh.ColumnDataSource({data: curve.data});
      const colour = PALETTE[i % PALETTE.length];
      const line = plot.line({field: "x"}, {field: "y"}, {source: source, line_color: colour, line_width: 2});
      const dots = plot.scatter({field: "x"}, {field: "y"}, {source: source, fill_color: colour, line_color: colour, size: 8});
      items.push(new Bokeh.LegendItem({label: {value: curve.name}, renderers: [line, dots]}));
      hovered.push(dots);
    });
    chart.lines.forEach((line, j) => {
      const source = new Bokeh.ColumnDataSource({data: line.data});
      const colour = PALETTE[(chart.curves.length + j) % PALETTE.length];
      const segment = plot.segment({field: "x"}, {field: "y"}, {field: "x1"}, {field: "y"},
        {source: source, line_color: colour, line_width: 2, line_dash: j % 2 ? "dotted" : "dashed"});
      items.push(new Bokeh.LegendItem({label: {value: line.name}, renderers: [segment]}));
      hovered.push(segment);
    });
    if (chart.chosen) {
      const star = plot.scatter({field: "x"}, {field: "y"}, {source: new Bokeh.ColumnDataSource({data: chart.chosen}), marker: "star",
        size: 22, fill_color: "gold", line_color: "black"});
      items.push(new Bokeh.LegendItem({label: {value: "chosen by CV on the training data"}, renderers: [star]}));
      hovered.push(star);
    }
    plot.add_tools(new Bokeh.HoverTool({renderers: hovered, tooltips: TOOLTIPS}));
    plot.add_layout(new Bokeh.Legend({items: items, click_policy: "hide", label_text_font_size: "9pt", location: "top_left"}), "right");
    return plt.show(plot, "#accuracy-plot");
  }

  function heatmapPlot() {
    const matrix = page.heatmap;
    const n = matrix.classes.length;
    const source = new Bokeh.ColumnDataSource({data: {x: matrix.predicted, y: matrix.true.map((t) => n - 1 - t),
      true: matrix.true.map((t) => matrix.classes[t]), predicted: matrix.predicted.map((p) => matrix.classes[p]),
      count: matrix.count, rate: matrix.rate, share: matrix.rate.map((r) => (100 * r).toFixed(1) + "%")}});
    const side = Math.round(Math.min(900, Math.max(360, 14 * n + 160)));
    const plot = plt.figure({width: side, height: side, x_range: new Bokeh.Range1d({start: -0.5, end: n - 0.5}),
      y_range: new Bokeh.Range1d({start: -0.5, end: n - 0.5}), tools: "pan,wheel_zoom,box_zoom,reset", toolbar_location: "above",
      x_axis_label: "predicted class", y_axis_label: "true class"});
    const blues = Array.from({length: 9}, (_, i) => `rgb(${Math.round(247 - 239 * i / 8)},${Math.round(251 - 203 * i / 8)},${Math.round(255 - 148 * i / 8)})`);
    const mapper = new Bokeh.LinearColorMapper({palette: blues, low: 0, high: 1});
    plot.rect({field: "x"}, {field: "y"}, 1, 1, {source: source, fill_color: {field: "rate", transform: mapper}, line_color: null});
    plot.add_tools(new Bokeh.HoverTool({tooltips: [["true", "@true"], ["predicted", "@predicted"], ["test images", "@count"],
      ["of the true class", "@share"]]}));
    plot.grid.visible = false;
    if (n <= 40) {  // class names on the axes while they can be read; the hover names them always
      const ticks = matrix.classes.map((_, i) => i);
      plot.xaxis.ticker = new Bokeh.FixedTicker({ticks: ticks});
      plot.xaxis.major_label_overrides = new Map(matrix.classes.map((name, i) => [i, name]));
      plot.xaxis.major_label_orientation = 1.0;
      plot.yaxis.ticker = new Bokeh.FixedTicker({ticks: ticks});
      plot.yaxis.major_label_overrides = new Map(matrix.classes.map((name, i) => [n - 1 - i, name]));
    } else {
      plot.axis.major_label_text_font_size = "0px";
      plot.axis.major_tick_line_color = null;
    }
    return plt.show(plot, "#heatmap-plot");
  }

  function start() {
    wireTable();
    const drawn = [];
    if (page.embedding) drawn.push(scatterPlot());
    if (page.accuracy) drawn.push(accuracyPlot());
    if (page.heatmap) drawn.push(heatmapPlot());
    Promise.all(drawn).then(() => {
      api.ready = true;
      api.readyAt = performance.now();
    }, (error) => { api.errors.push(String(error)); throw error; });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
