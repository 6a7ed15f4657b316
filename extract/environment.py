"""The machine and software that computed a store: recorded in its run record at extraction (CNN
and baselines alike, through ``extract.pipeline``), shown by the report.

It is a record, never a setting: it stays out of the fingerprint, so a store moved to another
machine reads there as it did where it was made.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from extract import package_versions
from extract.parallel import host_cores

# The instruction sets that decide how fast (and through which kernels) the CPU computes features.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# Recorded only where the run imported them: a baseline run loads no deep-learning framework.
FRAMEWORKS = ("tensorflow", "jax", "torch", "ai_edge_litert")
PACKAGES = ("keras", "numpy", "h5py", "scikit-learn", "opencv-python-headless")


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``ISA_FLAGS`` it has (Linux: /proc/cpuinfo; elsewhere the model only)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine() or "unknown", []
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's; they are all alike
        if "model name" in fields and "flags" in fields:
            break
    flags = set(fields.get("flags", "").split())
    return fields.get("model name") or platform.processor() or platform.machine() or "unknown", [f for f in ISA_FLAGS if f in flags]


def _gpus() -> list[str]:
    """The GPUs the run's Keras backend sees, by name; none where Keras was not imported (a baseline run)."""
    if "keras" not in sys.modules:
        return []
    backend = sys.modules["keras"].backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.config.experimental.get_device_details(device).get("device_name", device.name)
                for device in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [device.device_kind for device in jax.devices() if device.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return []


def machine_environment() -> dict:
    """Host, CPU (model and ``ISA_FLAGS``), the logical cores this process may use, the GPUs and
    backend of Keras (where imported), and the versions of Python, the frameworks the run imported
    and ``PACKAGES``. JSON-serialisable; read once per run."""
    cpu, isa = _cpu()
    keras = sys.modules.get("keras")
    return {
        "host": platform.node(),
        "cpu": cpu,
        "isa": isa,
        "cores": host_cores(),
        "gpus": _gpus(),
        "keras_backend": keras.backend.backend() if keras else None,
        "versions": {"python": platform.python_version(),
                     **{name: str(sys.modules[name].__version__) for name in FRAMEWORKS if name in sys.modules},
                     **package_versions(*PACKAGES)},
    }
