"""TensorBoard Embedding Projector files of one layer, written without TensorFlow.

``python -m classify projector --features F --layer L`` writes, into
``reports/<dataset>/projector/<F>__<L>/``:

* ``tensors.tsv``: the layer's features of the sample, one image a row, as stored (or, with
  ``--pca N``, standardised and reduced to N dimensions, as ``make tsne`` does before t-SNE);
* ``metadata.tsv``: a header, then class, split and path of each row;
* ``sprite.png``: the images' thumbnails in rows of a square grid, ``SPRITE_CELL`` pixels each;
* ``projector_config.pbtxt`` (TensorBoard: ``tensorboard --logdir`` that folder) and
  ``projector_config.json`` (the standalone projector's "Load" dialog).

The sample is ``make tsne``'s: the same seeded, class-balanced rows for the same N and seed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from classify.embed import balanced_sample
from classify.thumbnails import ImageSource, ensure_thumbnails, thumb_name
from extract.errors import UserError
from extract.store import FeatureStore

log = logging.getLogger(__name__)

SPRITE_CELL = 64
MAX_SPRITE_SIDE = 8192  # the projector's limit on the sprite image


def _field(text) -> str:
    """One TSV field: tabs and line breaks would split it."""
    return " ".join(str(text).split())


def sprite(files: list[Path], cell: int = SPRITE_CELL) -> Image.Image:
    """The images in rows of a square grid, each fitted into a ``cell`` x ``cell`` square (centred)."""
    columns = math.ceil(math.sqrt(len(files)))
    sheet = Image.new("RGB", (columns * cell, math.ceil(len(files) / columns) * cell), "white")
    for i, file in enumerate(files):
        with Image.open(file) as picture:
            picture = picture.convert("RGB")
            scale = cell / max(picture.size)
            picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
            row, column = divmod(i, columns)
            sheet.paste(picture, (column * cell + (cell - picture.width) // 2, row * cell + (cell - picture.height) // 2))
    return sheet


def write_projector(store_path: str | Path, layer: str, out_dir: str | Path, *, report_dir: str | Path, n: int = 1000, seed: int = 0,
                    images: ImageSource | None = None, pca: int | None = None) -> Path:
    """Write the projector files of ``layer`` of the store into ``out_dir``; returns ``out_dir``."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    with FeatureStore(store_path) as store:
        if layer not in store.taps:
            raise UserError(f"{store.path} has no layer {layer!r}; it has {', '.join(store.taps)}")
        rows = balanced_sample(store.labels, n, seed)
        features = store.features(layer, rows)
        classes = np.asarray(store.classes, dtype=object)[store.labels[rows]]
        splits, paths = store.splits[rows], store.paths[rows]
        name = f"{store.extractor}/{layer}"
    if pca:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        standardised = StandardScaler().fit_transform(np.asarray(features, np.float64))
        features = PCA(min(pca, *standardised.shape), random_state=seed).fit_transform(standardised)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(out_dir / "tensors.tsv", features, fmt="%.6g", delimiter="\t")
    lines = ["class\tsplit\tpath", *(f"{_field(c)}\t{_field(s)}\t{_field(p)}" for c, s, p in zip(classes, splits, paths))]
    (out_dir / "metadata.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    embedding = {"tensorName": name, "tensorShape": list(features.shape), "tensorPath": "tensors.tsv", "metadataPath": "metadata.tsv"}
    config = [f"  tensor_name: {json.dumps(name, ensure_ascii=False)}", '  tensor_path: "tensors.tsv"', '  metadata_path: "metadata.tsv"']
    missing = ensure_thumbnails(report_dir, paths, images)
    columns = math.ceil(math.sqrt(len(paths)))
    if missing:
        log.warning("no sprite: %d of the %d images have no thumbnail", len(missing), len(paths))
    elif columns * SPRITE_CELL > MAX_SPRITE_SIDE:
        log.warning("no sprite: %d images make a sprite wider than %d px; use a smaller --n", len(paths), MAX_SPRITE_SIDE)
    else:
        sprite([report_dir / thumb_name(p) for p in paths]).save(out_dir / "sprite.png")
        embedding["sprite"] = {"imagePath": "sprite.png", "singleImageDim": [SPRITE_CELL, SPRITE_CELL]}
        config += ["  sprite {", '    image_path: "sprite.png"', f"    single_image_dim: {SPRITE_CELL}",
                   f"    single_image_dim: {SPRITE_CELL}", "  }"]
    (out_dir / "projector_config.pbtxt").write_text("embeddings {\n" + "\n".join(config) + "\n}\n", encoding="utf-8")
    (out_dir / "projector_config.json").write_text(json.dumps({"embeddings": [embedding]}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
