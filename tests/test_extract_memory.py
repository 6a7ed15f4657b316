"""``benchmarks/extract_memory.py``: a fresh process per size, each peak measured, the ratio computed."""

from __future__ import annotations

import pytest

from benchmarks import extract_memory


@pytest.mark.slow
def test_memory_benchmark_measures_each_size_in_a_fresh_process(tmp_path, capsys):
    results = extract_memory.main(["--sizes", "8,24", "--batch-size", "8", "--out", str(tmp_path / "memory.json")])
    assert [run["images"] for run in results["runs"]] == [8, 24]
    for run in results["runs"]:
        assert run["code"] == 0 and run["seconds"] > 0
        assert 200 * 1024 < run["vm_hwm_kib"] < 8 * 1024 * 1024  # a whole TensorFlow + Lite0 process, in KiB
    assert results["ratio"] == results["runs"][1]["vm_hwm_kib"] / results["runs"][0]["vm_hwm_kib"]
    assert results["ratio"] < 1.2
    assert "peak RSS of 24 images / 8 images" in capsys.readouterr().out
    assert (tmp_path / "memory.json").is_file()
