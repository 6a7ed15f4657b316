"""Shared fixtures: small image trees made on the fly, and the optional ../shared data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# The opening lines of a child process's script that runs as on the GPU machines: JAX, and
# TensorFlow unimportable.
WITHOUT_TENSORFLOW = textwrap.dedent('''
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTensorFlow())
''')

# The opening lines of a child process's script in which torch cannot be imported, and every
# attempt to import it is recorded in TORCH_IMPORTS. Looking at sys.modules afterwards proves
# nothing where torch is not installed: a reader that tries torch and falls back would pass.
WITHOUT_TORCH = textwrap.dedent('''
    import importlib.abc, sys

    TORCH_IMPORTS = []

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                TORCH_IMPORTS.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}")

    for _name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:  # imported at start-up
        del sys.modules[_name]
    sys.meta_path.insert(0, NoTorch())
''')


def run_without_torch(script: str, *args: str) -> dict:
    """Run ``script`` after ``WITHOUT_TORCH`` in a fresh Python, with ``args`` as sys.argv[1:]; the
    script leaves a JSON-able dict in ``result``, returned with ``torch_imports``: the torch
    modules it tried to import."""
    code = WITHOUT_TORCH + textwrap.dedent(script) + "\nimport json\nprint(json.dumps({**result, 'torch_imports': TORCH_IMPORTS}))\n"
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (tests marked shared_data need ../shared/data)")
    return path


def make_image_tree(root: Path, *, classes=("circle", "square"), per_class: dict[str, int] | None = None, size=48, seed=0,
                    colours: dict[str, tuple[int, int, int]] | None = None, background=(0, 60)) -> Path:
    """Write JPEGs of two visually distinct classes: ``root/<split>/<class>/<n>.jpg``.

    Circles and squares of random position, colour and size on a noisy background, so a
    probe has something real to learn. With ``colours`` ({class: RGB}) the classes are those
    and differ only in colour: a random circle or square of the class's colour (each channel
    within 25 of it).
    """
    per_class = per_class or {"train": 8, "test": 4}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, count in per_class.items():
        for label, name in enumerate(colours or classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = rng.integers(*background, (size, size, 3)).astype(np.uint8)
                cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
                r = rng.integers(size // 6, size // 3)
                circle = rng.random() < 0.5 if colours else label == 0
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2 if circle else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                image[mask] = np.clip(np.asarray(colours[name]) + rng.integers(-25, 26, 3), 0, 255) if colours else rng.integers(150, 256, 3)
                Image.fromarray(image).save(folder / f"{n:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs, as on this project's machines; it takes seconds to start."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "shapes")


TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``keras:PATH`` of a seeded two-convolution network (32 x 32 input, not mirror-symmetric) that stands in
    for a backbone where real TensorFlow must run in well under a second; its taps: conv1, conv2, fc."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    x = keras.layers.Rescaling(1 / 255, name="to_unit")(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="fc")(x)
    path = tmp_path_factory.mktemp("tiny") / "tiny.keras"
    keras.Model(inputs, outputs, name="tiny").save(path)
    return f"keras:{path}"


@pytest.fixture
def tmpfs(tmp_path):
    """mount(folder, size_kb, read_only=False): a real small tmpfs, unmounted afterwards; skips where mounting is not permitted."""
    mounted = []

    def mount(folder: Path, size_kb: int, *, read_only: bool = False) -> Path:
        folder.mkdir(exist_ok=True)
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        if folder in mounted:
            result = subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], capture_output=True, text=True)
        else:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")
        if folder not in mounted:
            mounted.append(folder)
        return folder

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
