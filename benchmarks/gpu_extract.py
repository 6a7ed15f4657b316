"""Extraction throughput on a GPU machine (or any machine), in one bounded run.

Writes ``--images`` JPEGs of 400x300 (photo-like; ``--unique`` distinct images, copied
byte for byte to fill the count, so that writing 20,000 takes seconds), then prints
images/s of
  * decode only: files -> decoded, resized 224x224 uint8 arrays in the decode threads, no model;
  * model only, for each ``--dtypes`` and ``--batch-sizes``: a uint8 batch in host memory ->
    features back in host memory (the featurizer's compiled call, as the pipeline calls it);
  * files -> store, for each dtype at ``--store-batch``: the real ``extract_to_store`` path
    (decode threads, model, HDF5 store), checked afterwards to hold one row per file, with the
    seconds spent assembling the store after the last batch (gzip) shown apart;
and the ratio files -> store / model only. With ``--out`` everything also goes to a JSON file.

Every measurement is time-boxed: decode only and model only run ``--seconds`` (model only
after its warm-up, compiling, batch); files -> store runs only if, at the slower of the two
rates, it should end before ``--deadline`` seconds; nothing starts after ``--budget``
seconds. What is skipped is listed as skipped. The defaults fit a GPU run in under 8 minutes:

    KERAS_BACKEND=jax python3 benchmarks/gpu_extract.py --out $OUT/gpu_extract.json

On a CPU (the test suite runs it so, with TensorFlow unimportable) pass a small
``--images`` and ``--batch-sizes``. Runs under any Keras backend; the device is the
backend's default one (JAX puts arrays on the GPU where there is one).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from io import BytesIO  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.datasets import load_dataset  # noqa: E402
from extract.parallel import decode_threads, host_cores  # noqa: E402
from extract.pipeline import ImageMapper, extract_to_store  # noqa: E402

WIDTH, HEIGHT = 400, 300


def photo_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """A 400x300 JPEG with smooth colour fields and texture, as costly to decode as a photo."""
    coarse = rng.integers(0, 255, (HEIGHT // 40, WIDTH // 40, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_jpegs(root: Path, count: int, *, unique: int = 256, seed: int = 0) -> Path:
    """``count`` JPEG files under ``root/{train,test}/class{0,1}/``: ``unique`` distinct images, repeated."""
    encoded = [photo_jpeg(np.random.default_rng([seed, i])) for i in range(min(unique, count))]
    for split in ("train", "test"):
        for label in (0, 1):
            (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        split = "test" if i % 4 == 0 else "train"
        (root / split / f"class{i % 2}" / f"{i:06d}.jpg").write_bytes(encoded[i % len(encoded)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(count)))
    return root


def device_info() -> dict:
    import keras

    backend = keras.backend.backend()
    info = {"keras_backend": backend, "keras": keras.__version__, "python": platform.python_version(),
            "host_cores": host_cores(), "decode_threads": decode_threads()}
    if backend == "jax":
        import jax

        info.update(jax=jax.__version__, default_backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                    device_kinds=sorted({d.device_kind for d in jax.devices()}))
    elif backend == "torch":
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                    devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"])
    elif backend == "tensorflow":
        import tensorflow as tf

        info.update(tensorflow=tf.__version__, devices=[d.name for d in tf.config.list_physical_devices()])
    return info


def model_only(featurizer, seconds: float) -> dict:
    """Images/s of ``featurizer`` on one random uint8 batch, host to host, for ``seconds`` after a warm-up batch."""
    batch = np.random.default_rng(0).integers(0, 256, (featurizer.batch_size, featurizer.input_size, featurizer.input_size, 3), dtype=np.uint8)
    start = time.perf_counter()
    featurizer(batch)  # compiles
    compile_s = time.perf_counter() - start
    batches, start = 0, time.perf_counter()
    while batches < 3 or time.perf_counter() - start < seconds:
        featurizer(batch)
        batches += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": batches * featurizer.batch_size / elapsed, "batches": batches, "seconds": elapsed,
            "first_batch_s": compile_s}


def decode_only(dataset, featurizer, seconds: float) -> dict:
    """Images/s of decoding and resizing files in the decode threads (no model), for at most ``seconds``."""
    start, done = time.perf_counter(), 0
    with ImageMapper(dataset, featurizer.prepare, min_side=featurizer.min_side) as mapper:
        window: list = []
        for row in range(len(dataset)):
            window.append(mapper.submit(row))
            if len(window) >= 4 * mapper.threads._max_workers:
                window.pop(0).result()
                done += 1
                if time.perf_counter() - start >= seconds:
                    break
        for future in window:
            future.result()
            done += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": done / elapsed, "images": done, "seconds": elapsed}


def files_to_store(dataset, featurizer, path: Path) -> dict:
    """Images/s of ``extract_to_store`` from files to a finished store; ``assembly_s``: the part spent after
    the last batch (the shards assembled into the compressed HDF5 file), which the store's run record leaves out."""
    import h5py

    start = time.perf_counter()
    extract_to_store(dataset, featurizer, path, progress=False, overwrite=True)
    elapsed = time.perf_counter() - start
    with h5py.File(path, "r") as f:
        rows = {name: len(f["layers"][name]) for name in f["layers"]}
        extraction_s = json.loads(f.attrs.get("run", "{}")).get("seconds", elapsed)
    return {"images_per_s": len(dataset) / elapsed, "seconds": elapsed, "assembly_s": max(0.0, elapsed - extraction_s),
            "store": str(path), "store_rows": min(rows.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="JPEG files of 400x300 to write and extract")
    parser.add_argument("--unique", type=int, default=256, help="distinct images among them")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layers", default=None, help="taps (default: all of the backbone's)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="64,256", help="model-only batch sizes")
    parser.add_argument("--store-batch", type=int, default=None, help="batch size of files -> store (default: the largest)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time of each model-only measurement after its warm-up")
    parser.add_argument("--budget", type=float, default=400.0, help="no measurement starts after this many seconds")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="files -> store starts only if it should end before this many seconds")
    parser.add_argument("--work-dir", default=None, help="where the JPEGs and stores go (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    import keras  # noqa: F401  (imports the backend: its time counts as start-up)

    from extract.extractor import CNNFeaturizer

    dtypes = args.dtypes.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    store_batch = args.store_batch or max(batch_sizes)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": device_info(), "model": args.model, "images": args.images, "image_size": [WIDTH, HEIGHT],
                     "model_only": [], "files_to_store": [], "skipped": []}
    print(f"device: {json.dumps(results['device'])}", flush=True)
    try:
        begin = time.perf_counter()
        shutil.rmtree(work / "photos", ignore_errors=True)
        dataset = load_dataset(f"folder:{write_jpegs(work / 'photos', args.images, unique=args.unique)}")
        results["write_jpegs_s"] = time.perf_counter() - begin
        print(f"{len(dataset)} JPEGs of {WIDTH}x{HEIGHT} written in {results['write_jpegs_s']:.1f} s; "
              f"start-up {begin - START:.1f} s; load average {os.getloadavg()[0]:.1f}", flush=True)

        def within_budget(what: str) -> bool:
            if time.perf_counter() - START < args.budget:
                return True
            results["skipped"].append(what)
            print(f"skipped (past the {args.budget:.0f} s budget): {what}", flush=True)
            return False

        for dtype in dtypes:
            if not within_budget(f"{dtype}: building the model"):
                continue
            begin = time.perf_counter()
            featurizer = CNNFeaturizer(args.model, layers=args.layers, batch_size=store_batch, dtype=dtype)
            print(f"{dtype}: model built in {time.perf_counter() - begin:.1f} s", flush=True)
            for batch_size in sorted(set(batch_sizes) | {store_batch}):
                if not within_budget(f"{dtype} batch {batch_size}"):
                    continue
                featurizer.batch_size = batch_size  # batches are padded to it; a new size compiles once
                if not results.get("decode_only"):
                    results["decode_only"] = decode_only(dataset, featurizer, args.seconds)
                    print(f"decode only: {results['decode_only']['images_per_s']:.0f} img/s "
                          f"({results['device']['decode_threads']} threads)", flush=True)
                measured = {"dtype": dtype, "batch": batch_size, **model_only(featurizer, args.seconds)}
                if batch_size in batch_sizes:
                    results["model_only"].append(measured)
                    print(f"model only: {dtype:<8} batch {batch_size:>4}: {measured['images_per_s']:>9.1f} img/s "
                          f"(first batch {measured['first_batch_s']:.1f} s)", flush=True)
                # A whole pass over the files cannot stop half-way: it starts only if it should end before --deadline.
                expected = len(dataset) / min(measured["images_per_s"], results["decode_only"]["images_per_s"])
                if batch_size == store_batch and expected * 1.5 + 10 > args.deadline - (time.perf_counter() - START):
                    results["skipped"].append(f"files -> store {dtype}")
                    print(f"skipped: files -> store {dtype} would take about {expected:.0f} s, past the {args.deadline:.0f} s "
                          "deadline (fewer --images fit)", flush=True)
                elif batch_size == store_batch and within_budget(f"files -> store {dtype}"):
                    stored = {"dtype": dtype, "batch": batch_size, **files_to_store(dataset, featurizer, work / f"store-{dtype}.h5")}
                    stored["ratio_to_model_only"] = stored["images_per_s"] / measured["images_per_s"]
                    results["files_to_store"].append(stored)
                    print(f"files -> store: {dtype:<8} batch {batch_size:>4}: {stored['images_per_s']:>9.1f} img/s, "
                          f"{stored['ratio_to_model_only']:.2f} of model only; {stored['store_rows']} rows stored; "
                          f"{stored['assembly_s']:.1f} of its {stored['seconds']:.1f} s assembling the store", flush=True)
            del featurizer
    finally:
        results["total_s"] = time.perf_counter() - START
        results["load_average"] = os.getloadavg()[0]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {results['total_s']:.1f} s; load average {results['load_average']:.1f}", flush=True)
    return results


if __name__ == "__main__":
    main()
