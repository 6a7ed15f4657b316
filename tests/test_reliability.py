"""Reliability under concurrency, hostile files and full disks (issue #13).

Real processes, real files and real mounts: two writers of one store at once, a lock
left by a killed process, leftovers of killed runs, crafted ``.pth`` files, shell
metacharacters through ``make``, huge and dangling images, read-only and full disks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from baselines.hog import HOGFeaturizer
from conftest import run_without_torch
from extract.datasets import load_dataset
from extract.pipeline import extract_to_store
from extract.store import FeatureStore, StoreLock, StoreLockedError, StoreMismatchError, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from conftest import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("rel") / "shapes", per_class={"train": 100, "test": 50}, size=40)


def _baselines(tree, features):
    return [sys.executable, "-m", "baselines", "--baselines", "hog", "--dataset", f"folder:{tree}",
            "--features-dir", str(features), "--checkpoint-seconds", "0", "--no-progress", "--threads", "1"]


def _assert_complete(store_path: Path, dataset) -> None:
    with FeatureStore(store_path) as store:
        assert list(store.paths) == list(dataset.paths)  # no row lost, none twice, same order
        features = store.features("hog")
    featurizer = HOGFeaturizer.for_dataset(dataset)
    for row in (0, len(dataset) // 2, len(dataset) - 1):
        np.testing.assert_allclose(features[row], featurizer.prepare(dataset.read(row)), rtol=1e-5, atol=1e-6)
    leftovers = [p.name for p in store_path.parent.iterdir() if p != store_path]
    assert leftovers == [], leftovers  # no lock, no .partial, no temporary file


# -- 2. one writer at a time -----------------------------------------------------------------------

@pytest.mark.slow
def test_two_writers_at_once_one_wins_the_other_names_it(tree, tmp_path):
    dataset = load_dataset(f"folder:{tree}")
    refused = 0
    for attempt in range(4):
        features = tmp_path / f"attempt{attempt}"
        processes = [subprocess.Popen(_baselines(tree, features), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in processes]
        codes = [p.returncode for p in processes]
        assert 0 in codes, outputs
        for code, output in zip(codes, outputs):
            if code != 0:
                assert code == 2, output
                assert re.search(r"^error: \S+hog\.h5 is being written by process \d+ \(lock ", output, re.M), output
                assert "Traceback" not in output
                refused += 1
        _assert_complete(features / "shapes" / "hog.h5", dataset)
    assert refused >= 1  # the two runs did overlap


def _hold_lock(store: Path) -> subprocess.Popen:
    """A separate process that holds the store's lock until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from extract.store import StoreLock; "
         "StoreLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(store)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(image_tree, tmp_path):
    dataset, featurizer = load_dataset(f"folder:{image_tree}"), HOGFeaturizer(32)
    store = tmp_path / "features" / "shapes" / "hog.h5"
    store.parent.mkdir(parents=True)
    holder = _hold_lock(store)
    try:
        with pytest.raises(StoreLockedError, match=rf"hog\.h5 is being written by process {holder.pid} "):
            extract_to_store(dataset, featurizer, store, progress=False)
        assert not store.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert store.with_name("hog.h5.lock").exists()  # left behind by the killed holder
    extract_to_store(dataset, featurizer, store, progress=False)
    with FeatureStore(store) as done:
        assert len(done) == len(dataset)
    assert not store.with_name("hog.h5.lock").exists()


def test_lock_is_released_when_opening_fails(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    store = tmp_path / "hog.h5"
    extract_to_store(dataset, HOGFeaturizer(32), store, progress=False)
    with pytest.raises(StoreMismatchError, match=r"hog\.h5 holds features made with other settings:\n  side: 32 in the store, 40 now\n"):
        extract_to_store(dataset, HOGFeaturizer(40), store, progress=False)
    with StoreLock(store):  # free again
        pass


def _partial_with_duplicate_rows(dataset, featurizer, store: Path) -> Path:
    """The ``.partial/`` that two writers killed mid-run used to leave: two shards with the same rows."""
    with StoreWriter(store, dataset=dataset, extractor="hog", fingerprint=featurizer.fingerprint(), taps=["hog"]) as writer:
        for _ in range(2):
            rows = writer.pending_rows()[:6]
            writer.write_shard(rows, {"hog": np.stack([featurizer.prepare(dataset.read(int(r))) for r in rows])})
    partial = store.with_name(store.name + ".partial")
    first = sorted(partial.glob("shard-*.npz"))[0]
    shutil.copy(first, partial / "shard-000000000-dupdup.npz")
    return partial


@pytest.mark.parametrize("overwrite", [False, True])
def test_doubly_killed_partial_with_duplicate_rows_recovers(image_tree, tmp_path, overwrite):
    dataset, featurizer = load_dataset(f"folder:{image_tree}"), HOGFeaturizer(32)
    store = tmp_path / "features" / "shapes" / "hog.h5"
    store.parent.mkdir(parents=True)
    _partial_with_duplicate_rows(dataset, featurizer, store)
    extract_to_store(dataset, featurizer, store, progress=False, overwrite=overwrite)
    with FeatureStore(store) as done:
        assert list(done.paths) == list(dataset.paths)
        np.testing.assert_allclose(done.features("hog")[3], featurizer.prepare(dataset.read(3)), rtol=1e-6)
    assert sorted(p.name for p in store.parent.iterdir()) == ["hog.h5"]


def test_overwrite_starts_clean_even_from_an_unreadable_partial(image_tree, tmp_path):
    dataset, featurizer = load_dataset(f"folder:{image_tree}"), HOGFeaturizer(32)
    store = tmp_path / "hog.h5"
    partial = store.with_name("hog.h5.partial")
    partial.mkdir()
    (partial / "manifest.json").write_text("{ not json")
    (partial / "shard-000000000-aaaaaa.npz").write_bytes(b"junk")
    extract_to_store(dataset, featurizer, store, progress=False, overwrite=True)
    with FeatureStore(store) as done:
        assert len(done) == len(dataset)
    assert not partial.exists()


# -- 4. orphans ------------------------------------------------------------------------------------

@pytest.mark.parametrize("store_exists", [False, True])
def test_temporary_files_of_a_killed_assembly_are_removed(image_tree, tmp_path, store_exists):
    dataset, featurizer = load_dataset(f"folder:{image_tree}"), HOGFeaturizer(32)
    store = tmp_path / "hog.h5"
    if store_exists:
        extract_to_store(dataset, featurizer, store, progress=False)
    orphan = tmp_path / ".hog.h5.tmp-1a2b3c4d"
    orphan.write_bytes(b"\x89HDF\r\n\x1a\n half an assembly")
    other = tmp_path / ".color.h5.tmp-1a2b3c4d"  # another store's: not ours to remove
    other.write_bytes(b"x")
    extract_to_store(dataset, featurizer, store, progress=False)
    assert not orphan.exists() and other.exists()


# -- 5. crafted .pth files -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_checkpoints_load_or_are_refused_in_one_line_never_crash(tmp_path, seed):
    """About 5,500 crafted files per seed (boundary and random sizes, strides, offsets and dtypes,
    truncations, flipped bytes), read in a child process so that a segfault fails the test."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "pth_fuzz.py"), str(tmp_path), str(seed)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the reader crashed (rc {result.returncode}):\n{result.stderr[-3000:]}"
    summary = json.loads(result.stdout)
    assert summary["wrong"] == []
    assert summary["refused"] > 4000 and summary["loaded"] > 100


def test_storage_smaller_than_its_tensor_is_refused_not_read_past(tmp_path):
    """The 1 KB-from-a-4-byte-storage case: a tensor of 16x16 floats over a storage of one."""
    from pth_fuzz import Storage, Tensor, legacy_bytes  # fake torch modules only while writing

    liar = Storage("0", "FloatStorage", 256, data_numel=1)
    path = tmp_path / "liar.pth"
    path.write_bytes(legacy_bytes({"w": Tensor(liar, 0, (16, 16), (16, 1))}, [liar]))
    read = run_without_torch('''
        from extract.torch_weights import CheckpointError, load_state_dict

        try:
            load_state_dict(sys.argv[1])
            result = {"refused": None}
        except CheckpointError as error:
            result = {"refused": str(error)}
    ''', str(path))
    assert read["refused"] and re.search(r"liar\.pth: .*storage '0' holds 1 elements, its tensors say 256", read["refused"]), read
    assert read["torch_imports"] == []  # refused by this reader, which never tried torch


# -- 6. make passes every value as one argument ----------------------------------------------------

def _make(*args, **kwargs) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], env=env, capture_output=True,
                          text=True, timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture
def installed_venv():
    """``make`` targets depend on ``setup``; running them must not reinstall anything."""
    if _make("-q", ".venv/.installed").returncode != 0:
        pytest.skip(".venv is not installed and up to date (run `make setup` first)")


MARKERS = ("pwned-by-test-1", "pwned-by-test-2", "pwned-by-test-3")
HOSTILE = f"it's a \"$HOME\"; touch {MARKERS[0]}; ' `touch {MARKERS[1]}` $(shell touch {MARKERS[2]}) é #x"

# target -> the variables it passes, and the flag each one becomes
MAKE_TARGETS = {
    "extract": {"DATASET": "--dataset", "MODEL": "--model", "LAYERS": "--layers", "POOLING": "--pooling", "VIEWS": "--views", "WEIGHTS": "--weights", "DTYPE": "--dtype",
                "DATA_DIR": "--data-dir", "LIMIT": "--limit", "ON_ERROR": "--on-error", "CROP": "--crop", "SEED": "--seed",
                "CHECKPOINT_SECONDS": "--checkpoint-seconds"},
    "layers": {"MODEL": "--model"},
    "fetch": {"DATASET": "--dataset"},
    "data-info": {"DATASET": "--dataset", "DATA_DIR": "--data-dir"},
    "baselines": {"DATASET": "--dataset", "BASELINES": "--baselines"},
    "classify": {"DATASET": "--dataset", "CLASSIFIER": "--classifier", "FEATURES": "--features", "LAYERS": "--layers",
                 "PROTOCOL": "--protocol", "SEED": "--seed", "WORKERS": "--workers", "RAY_ADDRESS": "--ray-address"},
    "tsne": {"DATASET": "--dataset", "MODEL": "--model", "N": "--n"},
    "report": {"DATASET": "--dataset"},
    "finetune": {"DATASET": "--dataset", "MODEL": "--model", "TRAIN": "--train", "EPOCHS": "--epochs", "WEIGHTS": "--weights",
                 "BATCHNORM": "--batchnorm"},
    "pretrain": {"DATASET": "--dataset", "EPOCHS": "--pretrain-epochs"},
    "recipe": {"DATASET": "--dataset", "EPOCHS": "--epochs"},
}


@pytest.mark.parametrize("target", sorted(MAKE_TARGETS))
def test_make_passes_hostile_values_as_one_argument(target, tmp_path, installed_venv):
    log = tmp_path / "argv.jsonl"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    variables = {**{name: HOSTILE for name in MAKE_TARGETS[target]}, "FULL": "1", "OVERWRITE": "1"}
    result = _make(target, f"PY={fake}", *(f"{k}={v}" for k, v in variables.items()))
    assert result.returncode == 0, result.stderr
    try:
        argv = [json.loads(line) for line in log.read_text().splitlines()]
        command = argv[-1]  # the target's own command comes last (after setup's)
        for name, flag in MAKE_TARGETS[target].items():
            assert command[command.index(flag) + 1] == HOSTILE, (name, command)
    finally:
        pwned = [m for m in MARKERS if (ROOT / m).exists()]
        for marker in pwned:
            (ROOT / marker).unlink()
    assert pwned == []


def test_make_benchmark_over_datasets_quotes_each_name(tmp_path, installed_venv):
    log = tmp_path / "argv.jsonl"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    result = _make("benchmark", f"PY={fake}", f"DATASETS=it's;touch {MARKERS[0]} é$HOME")
    pwned = (ROOT / MARKERS[0]).exists()
    (ROOT / MARKERS[0]).unlink(missing_ok=True)
    assert result.returncode == 0 and not pwned, result.stderr
    datasets = {a[a.index("--dataset") + 1] for a in map(json.loads, log.read_text().splitlines()) if "--dataset" in a}
    assert datasets == {"it's;touch", f"{MARKERS[0]}", "é$HOME"}


def test_make_data_info_on_a_folder_named_with_quote_space_dollar_semicolon_and_accent(tmp_path, installed_venv):
    from conftest import make_image_tree

    folder = make_image_tree(tmp_path / "it's $HOME; touch pwned é" / "shapes")
    result = _make("data-info", f"DATASET=folder:{folder}")
    pwned = (ROOT / "pwned").exists()
    (ROOT / "pwned").unlink(missing_ok=True)
    assert result.returncode == 0 and not pwned, result.stderr
    assert "shapes: 24 images, 2 classes" in result.stdout
    assert "missing files: 0" in result.stdout


# -- 7. very large images --------------------------------------------------------------------------

def test_a_100_megapixel_jpeg_is_decoded_at_reduced_scale(tmp_path):
    from PIL import Image

    from extract.images import read_image

    stripes = np.zeros((10_000, 10_000), np.uint8)
    stripes[::100] = 255
    Image.fromarray(stripes).save(tmp_path / "huge.jpg", quality=80)  # 100 MP: over PIL's 89.5 MP warning
    rgb = read_image(tmp_path / "huge.jpg", min_side=224)
    assert rgb.shape == (1250, 1250, 3)  # decoded at 1/8 scale, not refused


def test_an_image_beyond_the_limit_is_refused_naming_the_limit(tmp_path):
    import struct
    import zlib

    from extract.images import MAX_PIXELS, ImageDecodeError, read_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # a 400 MP grayscale PNG of 60 bytes
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    with pytest.raises(ImageDecodeError, match=rf"bomb\.png: image of 20000x20000 = 400,000,000 pixels is beyond the limit of {MAX_PIXELS:,} pixels"):
        read_image(tmp_path / "bomb.png", min_side=224)


# -- 8. symbolic links -----------------------------------------------------------------------------

def test_dangling_and_looping_symlinks_are_counted_and_listed(image_tree, tmp_path, capsys):
    from extract.cli import main
    from extract.images import ImageDecodeError

    (image_tree / "train" / "circle" / "dangling.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (image_tree / "train" / "square" / "loop.jpg").symlink_to("loop.jpg")
    (image_tree / "train" / "square" / "alias.jpg").symlink_to("000.jpg")  # a working link is an image
    dataset = load_dataset(f"folder:{image_tree}")
    assert len(dataset) == 27

    assert main(["data-info", "--dataset", f"folder:{image_tree}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "missing files: 2\n" in out
    assert f"  train/circle/dangling.jpg (dangling symbolic link to {tmp_path / 'moved-away.jpg'})" in out
    assert "  train/square/loop.jpg (symbolic link loop)" in out
    assert "unreadable files: 0" in out

    with pytest.raises(ImageDecodeError, match=r"dangling\.jpg: file not found \(dangling symbolic link"):
        extract_to_store(dataset, HOGFeaturizer(32), tmp_path / "hog.h5", progress=False)
    extract_to_store(dataset, HOGFeaturizer(32), tmp_path / "hog.h5", progress=False, on_error="skip")
    with FeatureStore(tmp_path / "hog.h5") as store:
        assert len(store) == 25
        assert dict(store.skipped) == {
            "train/circle/dangling.jpg": f"file not found (dangling symbolic link to {tmp_path / 'moved-away.jpg'})",
            "train/square/loop.jpg": "file not found (symbolic link loop)",
        }


# -- 9. read-only folders and full disks: one line, exit 2, recoverable ----------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """520 images of 64 px: one ``raw`` shard of 256 rows is about 1 MB, the store about 1.1 MB."""
    from conftest import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("disk") / "shapes", per_class={"train": 160, "test": 100}, size=64)


def _raw(photos, features, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "baselines", "--baselines", "raw", "--dataset", f"folder:{photos}",
                           "--features-dir", str(features), "--checkpoint-seconds", "0", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def _one_error_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, f"rc {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), result.stderr


FULL = r"error: cannot write {}: No space left on device; free some space there, or write elsewhere with --features-dir, then rerun the same command \(finished work is kept\)"


@pytest.mark.slow
def test_full_disk_at_a_shard_and_at_assembly_is_one_line_then_resumes(photos, tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 300)
    partial = disk / "shapes" / "raw.h5.partial"
    _one_error_line(_raw(photos, disk), FULL.format(re.escape(str(partial)) + r"/shard-\d{9}-[0-9a-f]{6}\.npz"))

    tmpfs(disk, 2600)  # room for the shards (2.1 MB), not for the store beside them
    _one_error_line(_raw(photos, disk), FULL.format(re.escape(str(disk / "shapes" / "raw.h5"))))
    assert sorted(p.name for p in (disk / "shapes").iterdir()) == ["raw.h5.partial"]  # no temporary file, no lock
    assert sum(len(np.load(s)["rows"]) for s in partial.glob("shard-*.npz")) == 520

    tmpfs(disk, 8000)
    result = _raw(photos, disk)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "520 of 520 rows already done" in result.stderr
    with FeatureStore(disk / "shapes" / "raw.h5") as store:
        assert len(store) == 520 and store.features("raw").shape == (520, 1024)


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    return apply


@pytest.mark.slow
def test_file_size_limit_at_a_shard_and_at_assembly_is_one_line_then_resumes(photos, tmp_path):
    """RLIMIT_FSIZE: a real write failure (EFBIG) on any machine, without root."""
    features = tmp_path / "features"
    partial = features / "shapes" / "raw.h5.partial"
    too_large = r"error: cannot write {}: File too large; the file is larger than this process may write \(ulimit -f\): raise the limit, then rerun the same command \(finished work is kept\)"
    _one_error_line(_raw(photos, features, preexec_fn=_file_size_limit(500_000)),
                    too_large.format(re.escape(str(partial)) + r"/shard-\d{9}-[0-9a-f]{6}\.npz"))
    _one_error_line(_raw(photos, features, preexec_fn=_file_size_limit(1_100_000)),  # shards fit, the store does not
                    too_large.format(re.escape(str(features / "shapes" / "raw.h5"))))
    assert sorted(p.name for p in (features / "shapes").iterdir()) == ["raw.h5.partial"]
    result = _raw(photos, features)
    assert result.returncode == 0 and "520 of 520 rows already done" in result.stderr, result.stderr


def test_read_only_features_folder_is_one_line(photos, tmp_path, tmpfs):
    readonly = tmp_path / "readonly"
    if os.geteuid() == 0:
        tmpfs(readonly, 1000, read_only=True)  # root writes through chmod: a read-only mount it cannot
    else:
        readonly.mkdir()
        readonly.chmod(0o555)
    name = re.escape(str(readonly / "shapes"))
    _one_error_line(_raw(photos, readonly), rf"error: (cannot write {name}: Read-only file system; the folder is on a read-only file system:"
                    rf"|{name}: Permission denied; give this user access to it, or) write elsewhere with --features-dir")


def _forged_pth(path: Path) -> Path:
    """A legacy .pth whose state dict would run ``touch pwned`` if unpickled naively."""
    import pickle

    from extract.torch_weights import LEGACY_MAGIC_NUMBER

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {path.parent / 'pwned'}",)

    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump({"_conv_stem.weight": Exploit()}, handle, protocol=2)
    return path


@pytest.mark.slow
def test_garbage_and_forged_weights_are_one_line_through_the_cli(image_tree, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    command = [sys.executable, "-m", "extract", "features", "--model", "efficientnet_lite0", "--dataset", f"folder:{image_tree}",
               "--features-dir", str(tmp_path / "features"), "--no-progress"]
    result = subprocess.run([*command, "--weights", str(garbage)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    _one_error_line(result, rf"error: {re.escape(str(garbage))}: not a readable PyTorch checkpoint \(.*\); pass a \.pth saved by "
                            r"torch\.save\(model\.state_dict\(\)\), or WEIGHTS=imagenet for the packaged weights")

    from extract.cli import main

    forged = _forged_pth(tmp_path / "forged.pth")
    assert main(command[3:] + ["--weights", str(forged)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {forged}: checkpoint refers to the global posix.system, which is not allowed")
    assert not (tmp_path / "pwned").exists()


# -- 11. a folder with a train split only ----------------------------------------------------------

def test_train_only_folder_holds_out_a_seeded_stratified_test_split(tmp_path, caplog):
    import logging

    from conftest import make_image_tree

    from classify.evaluate import choose_splits

    tree = make_image_tree(tmp_path / "trainonly", per_class={"train": 8})
    with caplog.at_level(logging.INFO, logger="extract.datasets.folder"):
        dataset = load_dataset(f"folder:{tree}")
    assert "has a train folder but no test or val folder: testing on a seeded, stratified 25% of train (seed 0)" in caplog.text
    assert choose_splits(dataset.splits) == ("train", "test")  # what `make classify` would have stopped on
    counts = dataset.counts()
    assert counts["test"] == {"circle": 2, "square": 2} and counts["train"] == {"circle": 6, "square": 6}
    assert dataset.info["test_split"] == "held out from train"
    again = load_dataset(f"folder:{tree}")
    assert again.splits == dataset.splits and again.digest() == dataset.digest()  # seeded: a rerun resumes the same store
    assert load_dataset(f"folder:{tree}", seed=1).splits != dataset.splits


def test_a_command_process_exits_with_its_code_output_and_atexit_handlers_but_no_final_collection(tmp_path):
    """``exit_process`` (every ``python -m`` entry point) skips only the interpreter's last garbage
    collections: the exit code, buffered output and atexit handlers (Ray, loky, h5py close there) stay."""
    script = (
        "import atexit, gc, sys\n"
        "from extract.commands import exit_process\n"
        "atexit.register(lambda: open(sys.argv[1], 'w').write(str(gc.get_freeze_count())))\n"
        "print('buffered, not yet flushed', end='')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "frozen.txt")], capture_output=True, text=True, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered, not yet flushed", "")
    assert int((tmp_path / "frozen.txt").read_text()) > 1000  # the objects alive at exit were frozen, not collected


@pytest.mark.slow
def test_the_kill_campaign_over_classify_keeps_every_row_once_and_identical():
    """``benchmarks/kill_campaign.py --phases classify``: SIGKILLs of ``python -m classify probe`` at random
    moments, then a finish; every row once, as in an uninterrupted run, and no temporary file left."""
    done = subprocess.run([sys.executable, "benchmarks/kill_campaign.py", "--phases", "classify", "--kills", "4", "--images", "60"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert re.search(r"^kills: 4 in \d+ runs", done.stdout, re.MULTILINE), done.stdout
    for line in ("rows missing: 0 (of 27)", "rows present twice: 0", "rows differing from the uninterrupted run", "temporary files left: none"):
        assert line in done.stdout, done.stdout
    assert re.search(r"rows differing from the uninterrupted run \(.*\): 0$", done.stdout, re.MULTILINE), done.stdout
