"""Peak memory of extraction does not grow with the number of images.

A fresh process per size runs ``python -m extract features`` under ``benchmarks/extract_memory.py``'s
runner, which reports the process's peak resident set (VmHWM). The model stands in for a backbone:
a 224 px input, so the 400 x 300 photos are decoded at full size (352 KiB each), and one tap of
65,536 floats (256 KiB an image). Keeping either for every image would add at least 256 KiB an
extra image: 48 MiB for the 192 extra images here. With a checkpoint after every batch, features
are held a batch at a time and the store is assembled shard by shard, so the extra images may cost
only what fills up once (HDF5's caches, the allocator's pools): 6 MiB here. The bound is half of 48 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import extract_memory
from benchmarks.gpu_extract import write_jpegs
from conftest import ROOT
from extract.store import FeatureStore

WIDE = 65_536  # floats in the model's one tap
BATCH = 32
SMALL, LARGE = 2 * BATCH, 8 * BATCH


def _wide_model(path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))  # as large as a backbone's: the photos are decoded at full size
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 32, strides=32, name="conv")(inputs))
    keras.Model(inputs, keras.layers.Dense(WIDE, name="wide")(x), name="wide").save(path)
    return path


def _peak_kib(folder, features, model) -> int:
    command = [sys.executable, "-c", extract_memory.RUNNER, "features", "--dataset", f"folder:{folder}", "--full",
               "--model", f"keras:{model}", "--layers", "wide", "--batch-size", str(BATCH), "--checkpoint-seconds", "0",
               "--features-dir", str(features), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["vm_hwm_kib"]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_images(tmp_path):
    model = _wide_model(tmp_path / "wide.keras")
    peaks = {}
    for count in (SMALL, LARGE):
        folder = write_jpegs(tmp_path / f"photos-{count}", count)
        peaks[count] = _peak_kib(folder, tmp_path / f"features-{count}", model)
        with FeatureStore(tmp_path / f"features-{count}" / f"photos-{count}" / "keras-wide.h5") as store:
            assert len(store) == count and store.dim("wide") == WIDE
    kept_per_image_kib = WIDE * 4 / 1024
    assert peaks[LARGE] - peaks[SMALL] < (LARGE - SMALL) * kept_per_image_kib / 2, peaks
