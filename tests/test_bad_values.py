"""Every bad value is one line naming the value and the range allowed, checked where the setting is
declared, before anything is written (issue #23, section 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extract.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _main(command: str):
    return {"extract": "extract.cli", "baselines": "baselines.__main__", "classify": "classify.cli", "transfer": "transfer.cli"}[command]


def _one_line(capsys, command: str, argv: list[str]) -> str:
    """Run ``python -m command argv`` in this process: exit 2 and one line on stderr, no traceback."""
    import importlib

    main = importlib.import_module(_main(command)).main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


CASES = [
    ("extract", ["features", "--seed", "-1"], "--seed: '-1' is not a whole number in [0, 4294967295]"),
    ("extract", ["features", "--batch-size", "0"], "--batch-size: '0' is not a whole number in [1, inf)"),
    ("extract", ["features", "--batch-size", "-4"], "--batch-size: '-4' is not a whole number in [1, inf)"),
    ("extract", ["features", "--crop-pct", "0"], "--crop-pct: '0' is not a number in (0, 1]"),
    ("baselines", ["--baselines", ",,"], "--baselines: ',,' names nothing"),
    ("baselines", ["--words", "-4"], "--words: '-4' is not a whole number in [2, inf)"),
    ("baselines", ["--words", "0"], "--words: '0' is not a whole number in [2, inf)"),
    *(("classify", ["probe", "--cs", grid], f"--cs: C grid '{grid}': give LOW:HIGH:COUNT") for grid in ("1:1e3:0", "0", "-1", "nan", "0:1:3")),
    ("classify", ["probe", "--cv", "0"], "--cv: '0' is not a whole number in [2, inf)"),
    ("classify", ["probe", "--cv", "1"], "--cv: '1' is not a whole number in [2, inf)"),
    ("classify", ["probe", "--repeats", "0", "--protocol", "fewshot:1,2"], "--repeats: '0' is not a whole number in [1, inf)"),
    ("classify", ["probe", "--repeats", "-1", "--protocol", "fewshot:1,2"], "--repeats: '-1' is not a whole number in [1, inf)"),
    ("classify", ["probe", "--seed", "-1"], "--seed: '-1' is not a whole number in [0, 4294967295]"),
    ("classify", ["probe", "--layers", ",,"], "--layers: ',,' names nothing"),
    *(("classify", ["probe", "--fuse", sizes], f"--fuse: '{sizes}': give auto, none, or how many taps to join, each a whole number "
       "in [2, inf), e.g. 2,3") for sizes in ("1,3", "x", ",")),
    ("classify", ["probe", "--cv-repeats", "0"], "--cv-repeats: '0' is not a whole number in [1, inf)"),
    ("classify", ["probe", "--jobs", "0"], "--jobs: '0' is not a whole number in [1, inf)"),
    *(("classify", ["tsne", "--n", n], f"--n: '{n}' is not a whole number in [3, inf)") for n in ("0", "-5", "2")),
    ("transfer", ["finetune", "--epochs", "0"], "--epochs: '0' is not a whole number in [1, inf)"),
    ("transfer", ["finetune", "--epochs", "-2"], "--epochs: '-2' is not a whole number in [1, inf)"),
    ("transfer", ["recipe", "--epochs", "0"], "--epochs: '0' is not a whole number in [1, inf)"),
    ("transfer", ["rule-of-thumb", "--regimes", ""], "--regimes: '' names nothing"),
    ("transfer", ["finetune", "--batch-size", "0"], "--batch-size: '0' is not a whole number in [1, inf)"),
    ("transfer", ["finetune", "--lr", "0"], "--lr: '0' is not a number in (0, inf)"),
    ("transfer", ["rule-of-thumb", "--sizes", "5,0"], "--sizes: '5,0': give training images per class"),
    ("extract", ["features", "--limit", "0"], "--limit: '0' is not a whole number in [1, inf)"),
    ("extract", ["features", "--workers", "0"], "--workers: '0' is not a whole number in [1, inf)"),
    ("extract", ["features", "--checkpoint-seconds", "nan"], "--checkpoint-seconds: 'nan' is not a number in [0, inf)"),
]


@pytest.mark.parametrize("command,argv,expected", CASES, ids=[" ".join([c, *a]) for c, a, _ in CASES])
def test_a_bad_argument_is_one_line_naming_it_and_the_range(capsys, tmp_path, command, argv, expected):
    dirs = {"extract": ["--features-dir", str(tmp_path)], "baselines": ["--features-dir", str(tmp_path)],
            "classify": ["--features-dir", str(tmp_path), "--results-dir", str(tmp_path)], "transfer": ["--results-dir", str(tmp_path)]}
    argv = [*argv[:1], *dirs[command], *argv[1:]] if command in ("classify", "transfer", "extract") else [*dirs[command], *argv]
    line = _one_line(capsys, command, argv)
    assert expected in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_settings_are_checked_where_they_are_declared():
    from baselines.registry import Options
    from classify.probe import LinearProbe
    from transfer.finetune import FinetuneSettings
    from transfer.recipe import RecipeSettings
    from transfer.rule_of_thumb import RuleSettings

    import numpy as np

    X, y = np.random.default_rng(0).normal(size=(12, 3)), np.arange(12) % 2
    for make, message in [
        (lambda: LinearProbe(cv=1).fit(X, y), "LinearProbe: cv=1 must be a whole number in [2, inf)"),
        (lambda: LinearProbe(seed=-1).fit(X, y), "LinearProbe: seed=-1 must be a whole number in [0, 4294967295]"),
        (lambda: LinearProbe(Cs=()).fit(X, y), "LinearProbe: Cs=() must be one or more values, each a number in (0, inf)"),
        (lambda: FinetuneSettings(epochs=0), "fine-tuning: epochs=0 must be a whole number in [1, inf)"),
        (lambda: RecipeSettings(train_epochs=-2), "the recipe: train_epochs=-2 must be a whole number in [1, inf)"),
        (lambda: RuleSettings(regimes=()), "no regime given (REGIMES=)"),
        (lambda: Options(words=0), "baselines: words=0 must be a whole number in [2, inf) (or None)"),
    ]:
        with pytest.raises(UserError) as refused:
            make()
        assert message in str(refused.value), str(refused.value)


def _refusal(make) -> str:
    """The one-line ``UserError`` (a ``ValueError``, as scikit-learn raises for a bad parameter) of ``make()``."""
    with pytest.raises(UserError) as refused:
        make()
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message, message
    return message


BAD_PARAMETERS = [  # (estimator, parameter, value, what the line says is allowed)
    ("LinearProbe", "classifier", "knn", "one of 'logreg', 'svm'"),
    ("LinearProbe", "search", "grid", "one of 'cv', 'val'"),
    ("LinearProbe", "normalization", "zscore", "one of 'standard', 'l2', 'sqrt', 'none'"),
    ("LinearProbe", "scoring", "f1", "one of 'accuracy', 'average_precision'"),
    ("LinearProbe", "blocks", (3, 0), "one or more values, each a whole number in [1, inf) (or None)"),
    ("LinearProbe", "blocks", (), "one or more values, each a whole number in [1, inf) (or None)"),
    ("LinearProbe", "Cs", (0.1, float("nan")), "one or more values, each a number in (0, inf)"),
    ("LinearProbe", "Cs", "1", "one or more values, each a number in (0, inf)"),
    ("LinearProbe", "val_fraction", 1.0, "a number in (0, 1)"),
    ("LinearProbe", "cv_repeats", 0, "a whole number in [1, inf)"),
    ("LinearProbe", "max_iter", 0, "a whole number in [1, inf)"),
    ("LinearProbe", "patience", 0, "a whole number in [1, inf) (or None)"),
    ("LinearProbe", "n_jobs", 0, "a whole number in [1, inf) (or None)"),
    ("LinearProbe", "cv", 2.5, "a whole number in [2, inf)"),
    ("LinearProbe", "cv_max_rows", 0, "a whole number in [1, inf) (or None)"),
    ("StreamingSGDProbe", "Cs", (), "one or more values, each a number in (0, inf)"),
    ("StreamingSGDProbe", "epochs", 0, "a whole number in [1, inf)"),
    ("StreamingSGDProbe", "tol", 0.0, "a number in (0, inf)"),
    ("StreamingSGDProbe", "chunk_rows", 0, "a whole number in [1, inf)"),
    ("StreamingSGDProbe", "batch_rows", 0, "a whole number in [1, inf)"),
    ("StreamingSGDProbe", "classifier", "knn", "one of 'logreg', 'svm'"),
    ("StreamingSGDProbe", "val_fraction", 0.0, "a number in (0, 1)"),
    ("StreamingSGDProbe", "keep", 0.0, "a number in (0, 1]"),
    ("StreamingSGDProbe", "seed", -1, "a whole number in [0, 4294967295]"),
    ("BlockNormalizer", "normalization", "zscore", "one of 'standard', 'l2', 'sqrt', 'none'"),
    ("BlockNormalizer", "blocks", (2, 0), "one or more values, each a whole number in [1, inf)"),
]


@pytest.mark.parametrize("estimator,name,value,allowed", BAD_PARAMETERS, ids=[f"{e}.{n}={v!r}" for e, n, v, _ in BAD_PARAMETERS])
def test_an_estimator_refuses_a_bad_parameter_at_fit_naming_it_and_its_range(tmp_path, estimator, name, value, allowed):
    import numpy as np

    import classify.probe
    from extract.store import FeatureStore

    valid = {"BlockNormalizer": {"blocks": (4,)}}.get(estimator, {})  # the other parameters' defaults are valid
    made = getattr(classify.probe, estimator)(**{**valid, name: value})  # scikit-learn's rule: __init__ only stores
    X, y = np.random.default_rng(0).normal(size=(12, 4)), np.arange(12) % 2
    if estimator == "StreamingSGDProbe":
        with FeatureStore(_small_store(tmp_path)) as store:
            message = _refusal(lambda: made.fit_store(store, "x", np.arange(14), store.labels))
    else:
        message = _refusal(lambda: made.fit(X, y))
    assert message == f"{estimator}: {name}={value!r} must be {allowed}", message


def test_every_estimator_parameter_and_settings_field_has_a_declared_range():
    from dataclasses import fields

    from classify.evaluate import PROBE_RANGES, ProbeSettings
    from classify.probe import BlockNormalizer, LinearProbe, StreamingSGDProbe

    for estimator in (LinearProbe, StreamingSGDProbe, BlockNormalizer):
        assert set(estimator._parameter_ranges) == set(estimator().get_params(deep=False)), estimator
    assert set(PROBE_RANGES) == {f.name for f in fields(ProbeSettings)} - {"recipe"}  # the recipe's name labels the rows


BAD_SETTINGS = [  # (ProbeSettings field, value, what the line says is allowed)
    ("classifiers", (), "one or more values, each one of 'logreg', 'svm', 'sgd'"),
    ("classifiers", ("logreg", "knn"), "one or more values, each one of 'logreg', 'svm', 'sgd'"),
    ("normalizations", (), "one or more values, each one of 'standard', 'l2', 'sqrt', 'none'"),
    ("search", "grid", "one of 'cv', 'val'"),
    ("select_by", "accuracy", "one of 'loss', 'score'"),
    ("fuse", (1,), "zero or more values, each a whole number in [2, inf)"),
    ("fuse", (2.5,), "zero or more values, each a whole number in [2, inf)"),
    ("Cs", (0.0, 1.0), "one or more values, each a number in (0, inf)"),
    ("cv", 1, "a whole number in [2, inf)"),
    ("cv_repeats", 0, "a whole number in [1, inf)"),
    ("repeats", 0, "a whole number in [1, inf)"),
    ("seed", 2**32, "a whole number in [0, 4294967295]"),
    ("n_jobs", 0, "a whole number in [1, inf) (or None)"),
    ("memory_budget", 0, "a whole number in [1, inf)"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_probe_settings_and_recipes_refuse_a_bad_value_naming_it_and_its_range(name, value, allowed):
    from dataclasses import replace

    from classify.evaluate import ProbeSettings
    from classify.recipe import RECIPES

    assert _refusal(lambda: ProbeSettings(**{name: value})) == f"probe settings: {name}={value!r} must be {allowed}"
    if name in RECIPES["best"].probe_settings():  # a recipe's fields are the settings' fields, with their ranges
        assert _refusal(lambda: replace(RECIPES["best"], **{name: value})) == f"recipe 'best': {name}={value!r} must be {allowed}"


def test_the_probe_command_refuses_a_bad_value_in_one_line_in_its_own_process(tmp_path):
    """A real ``python -m classify`` process: exit 2, one line, no traceback, nothing written."""
    done = subprocess.run([sys.executable, "-m", "classify", "probe", "--features-dir", str(tmp_path), "--results-dir", str(tmp_path),
                           "--protocol", "fewshot:1,2", "--repeats", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --repeats: '0' is not a whole number in [1, inf)", done.stderr
    assert list(tmp_path.iterdir()) == []


def test_more_words_than_descriptors_is_one_line(image_tree, tmp_path):
    from baselines.__main__ import run_baselines
    from extract.datasets import load_dataset

    dataset = load_dataset(f"folder:{image_tree}")
    with pytest.raises(UserError, match=r"would learn 100000 words from \d+ descriptors of 16 'train' images; give --words \d+ or fewer"):
        run_baselines(dataset, ["vlad"], features_dir=tmp_path, preset="fast", dense=True, words=100000, processes=0, progress=False)
    assert not list(tmp_path.rglob("*.h5"))


def test_an_interrupted_run_that_stored_no_row_does_not_block_a_corrected_rerun(image_tree, tmp_path):
    """A typo that failed after the .partial was opened (before any row was stored) leaves nothing
    to keep: the rerun with the corrected settings starts, instead of asking for --overwrite."""
    from baselines.hog import HOGFeaturizer
    from extract.datasets import load_dataset
    from extract.pipeline import extract_to_store
    from extract.store import StoreWriter

    dataset = load_dataset(f"folder:{image_tree}")
    path = tmp_path / "shapes" / "hog.h5"
    typo = HOGFeaturizer(24)
    with StoreWriter(path, dataset=dataset, extractor="hog", fingerprint=typo.fingerprint(), taps=typo.taps):
        pass  # the run died here: its manifest is written, no shard
    assert (tmp_path / "shapes" / "hog.h5.partial" / "manifest.json").is_file()
    extract_to_store(dataset, HOGFeaturizer(32), path, progress=False)
    assert path.is_file() and not (tmp_path / "shapes" / "hog.h5.partial").exists()


def test_a_ray_address_where_nothing_listens_is_one_line_not_a_wait(image_tree, tmp_path):
    pytest.importorskip("ray")
    result = subprocess.run([sys.executable, "-m", "baselines", "--baselines", "hog", "--dataset", f"folder:{image_tree}",
                             "--features-dir", str(tmp_path), "--ray-address", "127.0.0.1:1", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no Ray cluster answers at RAY_ADDRESS='127.0.0.1:1' (Connection refused)")


def test_an_empty_list_of_layers_is_one_line():
    from extract.backbones import get_backbone
    from extract.extractor import select_taps

    with pytest.raises(UserError, match=r"layers=',,' names no tap"):
        select_taps(get_backbone("efficientnet_lite0").feature_info, ",,")


def _small_store(features: Path) -> Path:
    """features/shapes/x.h5: 20 rows of two classes, 7 training images each."""
    import numpy as np

    from extract.datasets.base import ImageDataset
    from extract.store import StoreWriter

    labels = np.array([0, 1] * 10)
    dataset = ImageDataset("shapes", ("a", "b"), tuple(f"{i}.png" for i in range(20)), labels, tuple(["train"] * 14 + ["test"] * 6), read=None)
    with StoreWriter(features / "shapes" / "x.h5", dataset=dataset, extractor="x", fingerprint={"baseline": "x"}, taps=["x"]) as writer:
        writer.write_shard(np.arange(20), {"x": np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32) + labels[:, None]})
        writer.finalize()
    return features / "shapes" / "x.h5"


@pytest.mark.parametrize("protocol,expected", [
    ("fewshot:1,100", "fewshot:1,100 asks for 100 training images per class, but class 'a' has 7 in 'train': give shots of 7 or fewer"),
    ("transfer:train->train", "protocol 'transfer:train->train' would test on the images it trains on: give two different splits"),
    ("sampled:test->test", "protocol 'sampled:test->test' would test on the images it trains on"),
])
def test_a_protocol_that_cannot_mean_what_its_rows_would_say_is_one_line(capsys, tmp_path, protocol, expected):
    """Not a row labelled 100-shot fitted on 7 images per class, nor one tested on its own training images."""
    _small_store(tmp_path / "features")
    line = _one_line(capsys, "classify", ["probe", "--dataset", "folder:/nowhere/shapes", "--features-dir", str(tmp_path / "features"),
                                          "--results-dir", str(tmp_path / "results"), "--protocol", protocol, "--no-progress"])
    assert expected in line, line
    assert not (tmp_path / "results").exists()


def test_the_command_line_and_the_embedding_declare_one_sample_range():
    import classify.cli
    import classify.embed

    assert classify.cli.TSNE_SAMPLES == classify.embed.TSNE_SAMPLES


def test_read_only_results_and_reports_folders(capsys, tmp_path, tmpfs):
    """Every probe cached: nothing to write, so a read-only RESULTS_DIR works; what must be written
    there, or in a read-only REPORTS_DIR, is one line naming the option that moves it."""
    from classify.cli import main

    _small_store(tmp_path / "features")
    results, reports = tmpfs(tmp_path / "results", 2000), tmpfs(tmp_path / "reports", 2000)
    probe = ["probe", "--dataset", "folder:/nowhere/shapes", "--features-dir", str(tmp_path / "features"), "--results-dir", str(results),
             "--reports-dir", str(reports), "--no-progress", "--cs", "0.1,1"]
    assert main(probe) == 0
    before = (results / "shapes" / "results.csv").read_bytes()
    tmpfs(results, 2000, read_only=True)
    capsys.readouterr()
    assert main(probe) == 0
    assert "(1 rows, 1 probe jobs cached;" in capsys.readouterr().out
    assert (results / "shapes" / "results.csv").read_bytes() == before
    line = _one_line(capsys, "classify", [*probe, "--refit"])
    assert "Read-only file system" in line and line.endswith("write elsewhere with --results-dir"), line
    tmpfs(reports, 2000, read_only=True)
    line = _one_line(capsys, "classify", ["report", *probe[1:-3]])
    assert str(reports) in line and line.endswith("write elsewhere with --reports-dir"), line


@pytest.mark.parametrize("closed, low_in, high_in", [("both", True, True), ("left", True, False), ("right", False, True), ("neither", False, False)])
def test_an_interval_holds_exactly_the_ends_it_says(closed, low_in, high_in):
    """As scikit-learn's Interval: ``closed="right"`` is (0, 1] (a crop of 1.0 is the whole image), ``"left"`` is [0, 1)
    (a dropout of 1 drops everything); its printed form says the same."""
    from extract.arguments import number

    interval = number(0, 1, closed=closed)
    assert (0 in interval, 1 in interval, 0.5 in interval, 1.5 in interval) == (low_in, high_in, True, False)
    assert str(interval) == ("[" if low_in else "(") + "0, 1" + ("]" if high_in else ")")


@pytest.mark.parametrize("encoder, params, message", [
    ("BagOfWords", {"n_words": 0}, r"BagOfWords: n_words=0 must be a whole number in \[1, inf\)"),
    ("BagOfWords", {"levels": 1.5}, r"BagOfWords: levels=1.5 must be a whole number"),
    ("VLAD", {"seed": -1}, r"VLAD: seed=-1 must be a whole number in \[0, 4294967295\]"),
    ("FisherVector", {"layout": ((1, 1), (3,))}, r"FisherVector: layout=\(\(1, 1\), \(3,\)\) must be one or more values, each 2 values, each a whole number"),
    ("FisherVector", {"pca_dim": 0}, r"FisherVector: pca_dim=0 must be"),
])
def test_an_encoder_names_a_bad_parameter_when_it_is_fitted(encoder, params, message):
    """Checked where declared (scikit-learn's contract: ``__init__`` stores, ``fit`` checks), before any descriptor is read."""
    import numpy as np

    from baselines import encoders

    descriptors = np.random.default_rng(0).random((50, 8), dtype=np.float32)
    with pytest.raises(UserError, match=message):
        getattr(encoders, encoder)(**params).fit(descriptors)
