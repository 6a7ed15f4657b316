"""Where TensorFlow's CPU time goes in the CNN, per instruction set: oneDNN's own record of every primitive.

For each instruction set (``native``, and ``avx2`` with AVX-512 hidden by ``benchmarks/avx2_only.c``,
as ``extract_throughput.py`` does), a fresh process runs the model on the Keras runtime
(TensorFlow) with ``ONEDNN_VERBOSE=1`` and prints, per batch, the wall time, the time of each kind
of oneDNN primitive (1x1 convolutions, depthwise convolutions, GEMM calls from TensorFlow's own
Eigen convolutions, ...) and the rest (TensorFlow's kernels outside oneDNN):

    .venv/bin/python benchmarks/onednn_profile.py [--model efficientnet_lite0] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.extract_throughput import isa_environment  # noqa: E402

REPEATS = 3
CHILD = r"""
import sys, time
import numpy as np
from extract.extractor import CNNFeaturizer
featurizer = CNNFeaturizer(sys.argv[1], batch_size=int(sys.argv[2]), runtime="keras")
pixels = np.random.default_rng(0).integers(0, 256, (featurizer.batch_size, featurizer.input_size, featurizer.input_size, 3), dtype=np.uint8)
featurizer(pixels), featurizer(pixels)  # traced, and oneDNN's primitives created
print("MEASURED FROM HERE", flush=True)
start = time.perf_counter()
for _ in range(int(sys.argv[3])):
    featurizer(pixels)
print("WALL_MS", (time.perf_counter() - start) * 1000 / int(sys.argv[3]), flush=True)
"""


def profile(isa: str, model: str, batch_size: int, build: Path) -> None:
    env = {**isa_environment(isa, build), "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    lines = subprocess.run([sys.executable, "-c", CHILD, model, str(batch_size), str(REPEATS)], env=env, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    start = lines.index("MEASURED FROM HERE")
    isa_line = next((line.split("isa:")[1] for line in lines if ",isa:" in line), "not reported")
    per_kind: dict[str, float] = defaultdict(float)
    calls = 0
    wall = 0.0
    for line in lines[start:]:
        if line.startswith("WALL_MS"):
            wall = float(line.split()[1])
        elif line.startswith("onednn_verbose") and ",exec,cpu," in line:
            fields = line.split(",")
            per_kind[f"{fields[5]} {fields[6]}".strip()] += float(fields[-1]) / REPEATS
            calls += 1
    inside = sum(per_kind.values())
    print(f"\n== {isa} (oneDNN: {isa_line}); {model}, batch {batch_size}: {wall:.0f} ms per batch, "
          f"{calls / REPEATS:.0f} oneDNN calls per batch")
    for kind, ms in sorted(per_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<40} {ms:8.1f} ms  {100 * ms / wall:5.1f}%")
    print(f"  {'outside oneDNN (TensorFlow/Eigen kernels)':<40} {wall - inside:8.1f} ms  {100 * (wall - inside) / wall:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--isa", default="native,avx2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as build:
        for isa in args.isa.split(","):
            profile(isa, args.model, args.batch_size, Path(build))


if __name__ == "__main__":
    main()
