"""Keras weights files: which files hold weights (one suffix rule, for backbones and for
``transfer.layers.restore_layers``), reading one, and the record a store's fingerprint keeps of
the file its features came from."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import keras

from extract.errors import UserError
from extract.fileio import file_digest

# .weights.h5 is Keras 3's weights-only file, .h5 the legacy one (keras.applications' downloads).
WEIGHTS_SUFFIXES = (".keras", ".weights.h5", ".h5")


def _not_saved_from(path: Path, architecture: keras.Model, error: ValueError) -> UserError:
    keras_says = " ".join(str(error).split())  # Keras' message spans lines; an error here is one
    return UserError(f"{path} was not saved from this architecture ({keras_says}); pass weights saved from {architecture.name}")


def read_weights_file(path: str | Path, architecture: keras.Model, *, copy: bool = False) -> keras.Model:
    """The model whose weights ``path`` holds.

    A ``.keras`` file carries its architecture and layer names: it is loaded whole. A
    ``.weights.h5`` or ``.h5`` file stores weights by position only: they are loaded into
    ``architecture``, which must be the one they were saved from (into a clone of it with
    ``copy=True``, leaving ``architecture`` as it was).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not path.name.endswith(WEIGHTS_SUFFIXES):
        raise UserError(f"{path}: a weights file must end in {', '.join(WEIGHTS_SUFFIXES)}")
    if path.name.endswith(".keras"):
        return keras.saving.load_model(path, compile=False)
    target = keras.models.clone_model(architecture) if copy else architecture
    try:
        target.load_weights(path)
    except ValueError as error:
        raise _not_saved_from(path, architecture, error) from None
    return target


def load_weights_file(model: keras.Model, path: str | Path) -> dict:
    """Load the weights of ``path`` (``read_weights_file``) into ``model``, a ``.keras`` file's by
    position too; describe what was loaded (``weights_record``)."""
    source = read_weights_file(path, model)
    if source is not model:
        try:
            model.set_weights(source.get_weights())
        except ValueError as error:
            raise _not_saved_from(Path(path), model, error) from None
    return weights_record(path)


def weights_record(path: str | Path, *, source: str | None = None) -> dict:
    """What a store's fingerprint keeps of a weights file: where it came from (``source``, else the
    path), its name and its SHA-256."""
    path = Path(path)
    return {"weights": source or str(path), "weights_file": path.name, "weights_sha256": weights_sha256(path)}


def weights_sha256(path: str | Path) -> str:
    """``file_digest`` of a weights file, read once per process while the file is unchanged: a
    featurizer built twice, or its trainable backbone built beside the folded one, hashes the
    tens to hundreds of megabytes once."""
    stat = os.stat(path)
    # The change time too: a copy that keeps size and modification time (cp -p) still changes it.
    return _sha256_of(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return file_digest(path)
