"""The notebooks run headless on small data, so they never rot. Stored without outputs."""

from __future__ import annotations

import html
import json
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from conftest import ROOT, make_image_tree
from extract.datasets import load_dataset
from extract.extractor import CNNFeaturizer
from extract.pipeline import extract_to_store

NOTEBOOKS = ROOT / "notebooks"


def _run(name: str, env: dict, monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def _text(notebook) -> str:
    return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["explore_embeddings.ipynb", "transfer_recipe.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in notebook["cells"] if cell["cell_type"] == "code")


@pytest.mark.slow
def test_explore_embeddings_runs_on_a_small_store(tmp_path, monkeypatch):
    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 12, "test": 6})
    dataset = load_dataset(f"folder:{tree}")
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stage3,pre_logits", batch_size=8)
    store = extract_to_store(dataset, featurizer, tmp_path / "features" / "shapes" / "efficientnet_lite0.h5", progress=False)
    notebook = _run("explore_embeddings.ipynb", {"OFFSHELF_DATASET": f"folder:{tree}", "OFFSHELF_STORE": store,
                                                 "OFFSHELF_SAMPLES": 36, "OFFSHELF_THUMBS": tmp_path / "thumbs"}, monkeypatch)
    text = _text(notebook)
    assert "efficientnet_lite0 on shapes: 36 images, 2 classes" in text
    precision = float(text.split("precision@6 over these queries: ")[1].split()[0])
    assert precision >= 0.8  # circles find circles
    images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the embedding and the retrieval grid
    # the page's interactive view, inline: both layers over the same 36 images, thumbnails as data: URIs
    assert "interactive view: 2 layers, 36 images, 36 thumbnails" in text
    frames = [out["data"]["text/html"] for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "<iframe srcdoc=" in out.get("data", {}).get("text/html", "")]
    page = html.unescape(frames[0].split('srcdoc="')[1].split('"')[0])
    view = json.loads(re.search(r'id="offshelf-data">(.*?)</script>', page, re.S).group(1))["embedding"]
    assert [layer["name"] for layer in view["layers"]] == ["efficientnet_lite0 / stage3", "efficientnet_lite0 / pre_logits"]
    assert len(view["images"]["thumb"]) == 36 and all(t.startswith("data:image/jpeg;base64,") for t in view["images"]["thumb"])


@pytest.mark.slow
def test_transfer_recipe_runs_on_small_images(tmp_path, monkeypatch):
    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 16, "test": 6}, size=28)
    notebook = _run("transfer_recipe.ipynb", {
        "OFFSHELF_DATASET": f"folder:{tree}", "OFFSHELF_LIMIT": 32, "OFFSHELF_PRETRAIN": 32, "OFFSHELF_PRETRAIN_EPOCHS": 2,
        "OFFSHELF_EPOCHS": 2, "OFFSHELF_CHECKPOINT": tmp_path / "cae.keras", "OFFSHELF_RESULTS": tmp_path / "results",
    }, monkeypatch)
    text = _text(notebook)
    assert "conv1: trainable=False, identical to the autoencoder's after training: True" in text
    assert "conv2: trainable=False, identical to the autoencoder's after training: True" in text
    assert (tmp_path / "cae.keras").is_file() and (tmp_path / "results" / "results.csv").is_file()
    assert np.isfinite(float(text.split("reconstruction loss by epoch: [")[1].split(",")[0]))
