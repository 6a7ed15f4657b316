"""``benchmarks/gpu_extract.py`` runs where the GPU machines run it: JAX, no TensorFlow.
Here on CPU with a few images; its numbers are real and its store holds every image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import pytest

from conftest import ROOT, WITHOUT_TENSORFLOW

pytest.importorskip("jax", reason="jax is in the test extra; the GPU benchmark runs on JAX")

# TensorFlow is unimportable in the run, as on the GPU machines.
RUN_WITHOUT_TENSORFLOW = WITHOUT_TENSORFLOW + textwrap.dedent('''
    import runpy

    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    assert "tensorflow" not in sys.modules
    print("no tensorflow: ok")
''')


@pytest.mark.slow
def test_gpu_benchmark_runs_on_jax_without_tensorflow_and_fills_its_stores(tmp_path):
    images = 12
    out = tmp_path / "out" / "gpu_extract.json"
    command = [sys.executable, "-c", RUN_WITHOUT_TENSORFLOW, "benchmarks/gpu_extract.py", "--images", str(images), "--unique", "5",
               "--batch-sizes", "4,8", "--store-batch", "8", "--seconds", "0.2", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no tensorflow: ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"]["keras_backend"] == "jax" and results["device"]["devices"]
    assert results["device"]["decode_threads"] == len(os.sched_getaffinity(0)) + 2
    assert results["skipped"] == []
    assert {(m["dtype"], m["batch"]) for m in results["model_only"]} == {(d, b) for d in ("float32", "bfloat16") for b in (4, 8)}
    assert all(m["images_per_s"] > 0 and m["batches"] >= 3 for m in results["model_only"])
    assert results["decode_only"]["images_per_s"] > 0
    assert [s["dtype"] for s in results["files_to_store"]] == ["float32", "bfloat16"]
    for stored in results["files_to_store"]:
        assert stored["images_per_s"] > 0 and stored["ratio_to_model_only"] > 0 and stored["store_rows"] == images
        assert 0 <= stored["assembly_s"] < stored["seconds"]
        with h5py.File(stored["store"], "r") as f:
            assert {len(f["layers"][tap]) for tap in f["layers"]} == {images}
            assert json.loads(f.attrs["fingerprint"]).get("dtype") == (None if stored["dtype"] == "float32" else "bfloat16")
    assert len(list((tmp_path / "work" / "photos").rglob("*.jpg"))) == images
    for line in ("model only: bfloat16 batch    8:", "files -> store: float32  batch    8:", "decode only:"):
        assert line in done.stdout, done.stdout


def test_gpu_benchmark_skips_what_would_start_past_its_budget(tmp_path):
    """The time box: with no budget left, nothing is built or measured, and the JSON says so."""
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_extract.py", "--images", "4", "--budget", "0", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["skipped"] == ["float32: building the model", "bfloat16: building the model"]
    assert results["model_only"] == [] and results["files_to_store"] == []
