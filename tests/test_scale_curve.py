"""``benchmarks/scale_curve.py`` runs the Makefile's benchmark commands and fits their growth."""

from __future__ import annotations

import shlex
import subprocess

import numpy as np
import pytest

from benchmarks import scale_curve
from conftest import ROOT


def test_the_stages_are_the_makefiles_benchmark_commands(tmp_path):
    folder = tmp_path / "n2000"
    dirs = [f"FEATURES_DIR={folder / 'features'}", f"RESULTS_DIR={folder / 'results'}", f"REPORTS_DIR={folder / 'reports'}"]
    planned = subprocess.run(["make", "-n", "benchmark", "LIMIT=1333", *dirs], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    commands = [shlex.split(line) for line in planned.replace("\\\n", " ").splitlines() if ".venv/bin/python -m " in line and "fetch" not in line]
    made = [command[command.index("-m"):] for command in commands if "pip" not in command]
    ours = [command[command.index("-m"):] for command in (scale_curve.stage_command(stage, 2000, folder, None) for stage in scale_curve.STAGES)]
    assert ours == made


def test_the_exponent_is_the_log_log_slope():
    images = np.array([2_000, 10_000, 70_000])
    assert scale_curve.exponent(images, 3.0 * images) == pytest.approx(1.0)
    assert scale_curve.exponent(images, 0.1 * images ** 1.5) == pytest.approx(1.5)
    assert np.isnan(scale_curve.exponent([2_000], [5.0]))
    assert scale_curve.subset_arguments(2_000) == ["--limit", "1333"] and scale_curve.subset_arguments(70_000) == ["--full"]
