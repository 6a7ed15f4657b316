"""Backbone families, taps inside nested models, selective restore, freezing, fine-tuning and
the original autoencoder recipe, all with real Keras models on small data."""

from __future__ import annotations

import hashlib
import urllib.error

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import make_image_tree
from extract.backbones import get_backbone, tap_tensor
from extract.backbones.keras_apps import WeightsUnavailableError
from extract.datasets import load_dataset
from extract.errors import UserError
from extract.extractor import CNNFeaturizer
from transfer.finetune import FinetuneSettings
from transfer.layers import LayerwiseAdam, restore_layers, set_trainable
from transfer.recipe import RecipeSettings
from transfer.rule_of_thumb import RuleSettings

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name, last_dim", [
    ("resnet50", 2048), ("vgg16", 4096), ("mobilenetv2", 1280), ("efficientnetb0", 1280), ("convnext_tiny", 768),
])
def test_every_keras_application_family_extracts_through_the_same_featurizer(name, last_dim):
    featurizer = CNNFeaturizer(name, weights="random", layers="0,-1", batch_size=2)
    images = [featurizer.prepare(RNG.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(2)]
    out = featurizer(images)
    first, last = featurizer.taps
    assert out[last].shape == (2, last_dim) and np.isfinite(out[last]).all()
    assert out[first].shape == (2, featurizer.dims[first])
    assert not np.allclose(out[last][0], out[last][1], rtol=1e-3, atol=0)  # the images are seen (random nets: tiny values)


def test_offline_without_cached_weights_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        get_backbone("mobilenetv2").build("imagenet")
    message = str(error.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert str(tmp_path / "keras" / "models") in message and "WEIGHTS=" in message


def _nested_model(path):
    """A user's model with a whole keras.applications network nested inside it as one layer."""
    inner = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="to_unit")(inputs)
    x = inner(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, outputs, name="user_model")
    model.save(path)
    return model, inner


def test_taps_inside_a_nested_model_without_graph_disconnected(tmp_path):
    path = tmp_path / "user_model.keras"
    model, inner = _nested_model(path)
    with pytest.raises(ValueError, match="Graph disconnected|not connected"):  # the trap users fall into
        keras.Model(model.inputs, inner.get_layer("block_5_add").output)
    tensor = tap_tensor(model, f"{inner.name}/block_5_add")
    assert tuple(tensor.shape) == (None, 12, 12, 32)

    featurizer = CNNFeaturizer(f"keras:{path}", layers="mobilenet*/block_5_add,logits", batch_size=2)
    assert featurizer.taps == [f"{inner.name}/block_5_add", "logits"]
    images = RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    out = featurizer(list(images))
    reference = keras.Model(inner.inputs, inner.get_layer("block_5_add").output)
    expected = np.asarray(reference(images.astype(np.float32) / 127.5 - 1)).mean(axis=(1, 2))
    np.testing.assert_allclose(out[featurizer.taps[0]], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["logits"], np.asarray(model(images.astype(np.float32))), rtol=1e-4, atol=1e-5)

    # a nested tap's name holds a "/": it is stored and read back like any other
    from extract.pipeline import extract_to_store
    from extract.store import FeatureStore

    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 2, "test": 1}, size=96)
    stored = extract_to_store(load_dataset(f"folder:{tree}"), featurizer, tmp_path / "user.h5", progress=False)
    with FeatureStore(stored) as store:
        assert store.taps == featurizer.taps and store.features(featurizer.taps[0]).shape == (6, 32)


def _small_cnn(name, conv2_filters=8):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(conv2_filters, 3, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x), name=name)


def test_selective_restore_reports_restored_and_skipped_layers(tmp_path):
    keras.utils.set_random_seed(1)
    source = _small_cnn("source")
    source.save(tmp_path / "source.keras")
    keras.utils.set_random_seed(2)
    related = _small_cnn("related", conv2_filters=6)  # conv2 differs in shape
    before_fc = related.get_layer("fc").get_weights()

    with pytest.raises(ValueError, match=r"cannot restore conv2: shape mismatch.*\(3, 3, 4, 6\).*\(3, 3, 4, 8\)"):
        restore_layers(related, tmp_path / "source.keras", ["conv*"])
    report = restore_layers(related, tmp_path / "source.keras", ["conv*", "bn*"], skip_mismatch=True)
    assert [t for t, _ in report.restored] == ["conv1", "bn1"]
    assert report.skipped[0][0] == "conv2" and "shape mismatch" in report.skipped[0][1]
    for name in ("conv1", "bn1"):
        for a, b in zip(related.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(related.get_layer("fc").get_weights(), before_fc):  # not asked for: untouched
        np.testing.assert_array_equal(a, b)
    assert "restored conv1" in str(report) and "skipped  conv2" in str(report)

    # A weights-only file restores into the same architecture; another one is refused clearly.
    source.save_weights(tmp_path / "source.weights.h5")
    keras.utils.set_random_seed(3)
    same = _small_cnn("same")
    restore_layers(same, tmp_path / "source.weights.h5", ["conv1"])
    np.testing.assert_array_equal(same.get_layer("conv1").get_weights()[0], source.get_layer("conv1").get_weights()[0])
    assert not np.array_equal(same.get_layer("conv2").get_weights()[0], source.get_layer("conv2").get_weights()[0])
    with pytest.raises(ValueError, match="not saved from this architecture"):
        restore_layers(related, tmp_path / "source.weights.h5", ["conv1"])
    with pytest.raises(ValueError, match="no layer matching"):
        restore_layers(same, tmp_path / "source.keras", ["nothing*"])



def test_backbones_and_restore_read_weights_files_by_one_suffix_rule(tmp_path):
    """WEIGHTS=FILE for a backbone and restore_layers accept the same files (.keras, .weights.h5 and
    the legacy .h5 keras.applications downloads) and refuse any other with the same message."""
    spec = get_backbone("efficientnet_lite0")
    keras.utils.set_random_seed(4)
    saved, _ = spec.build("random")
    expected = saved.get_layer("block6a_project_conv").get_weights()[0]
    files = [tmp_path / "lite0.keras", tmp_path / "lite0.weights.h5", tmp_path / "lite0.h5"]
    saved.save(files[0])
    saved.save_weights(files[1])
    saved.save(files[2])  # Keras' legacy HDF5 format
    target, _ = spec.build("random")
    for path in files:
        model, record = spec.build(str(path))
        np.testing.assert_array_equal(model.get_layer("block6a_project_conv").get_weights()[0], expected)
        assert record["weights_file"] == path.name and record["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        target.get_layer("block6a_project_conv").set_weights([np.zeros_like(expected)])
        restore_layers(target, path, ["block6a_*"])
        np.testing.assert_array_equal(target.get_layer("block6a_project_conv").get_weights()[0], expected)
    other = tmp_path / "lite0.ckpt"
    other.write_bytes(b"weights")
    refusals = []
    for load in (lambda: spec.build(str(other)), lambda: restore_layers(saved, other)):
        with pytest.raises(UserError) as error:
            load()
        refusals.append(str(error.value))
    assert refusals == [f"{other}: a weights file must end in .keras, .weights.h5, .h5"] * 2

def test_freeze_and_unfreeze_by_pattern_with_counts():
    model = _small_cnn("m")
    report = set_trainable(model, ["conv*", "bn1"], False)
    assert sorted(report.changed) == ["bn1", "conv1", "conv2"]
    frozen = sum(w.size for n in ("conv1", "conv2", "bn1") for w in model.get_layer(n).get_weights())
    assert report.frozen_parameters == frozen and report.trainable_parameters == model.count_params() - frozen
    assert set_trainable(model, "conv2", True).changed == ["conv2"]
    with pytest.raises(ValueError, match="no layer matches"):
        set_trainable(model, "absent*", False)

    # inside a nested model that is frozen as a whole, unfreezing one layer unfreezes only it
    inputs = keras.Input((16, 16, 3))
    inner = _small_cnn("inner")
    outer = keras.Model(inputs, keras.layers.Dense(2, name="top")(inner(inputs)), name="outer")
    set_trainable(outer, "inner/*", False)
    assert {v.path.split("/")[0] for v in outer.trainable_weights} == {"top"}
    assert set_trainable(outer, "inner/conv2", True).changed == ["inner/conv2"]
    assert {v.path.split("/")[0] for v in outer.trainable_weights} == {"conv2", "top"}


def test_layerwise_adam_scales_the_step_per_variable():
    model = _small_cnn("m")
    x, y = RNG.normal(size=(8, 16, 16, 3)).astype("float32"), RNG.integers(0, 3, 8)
    still = {v.path: 0.0 for v in model.get_layer("conv1").trainable_weights}
    model.compile(LayerwiseAdam(still, learning_rate=1e-2), "sparse_categorical_crossentropy", jit_compile=False)
    before = [w.copy() for w in model.get_layer("conv1").get_weights()] + [model.get_layer("fc").get_weights()[0].copy()]
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0], before[0])
    assert not np.array_equal(model.get_layer("fc").get_weights()[0], before[2])


def _variables_by_layer(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_finetune_top1_keeps_frozen_weights_bit_identical_and_follows_the_batchnorm_policy(tmp_path, batchnorm):
    from transfer.finetune import FinetuneSettings, build_finetune_model, make_optimizer, unfrozen_layer_paths
    from transfer.training import compile_and_fit, image_arrays

    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 6, "test": 3})
    dataset = load_dataset(f"folder:{tree}")
    settings = FinetuneSettings(train="top1", epochs=1, batch_size=4, weights="imagenet", batchnorm=batchnorm)
    model, backbone, spec, notes, dim = build_finetune_model("efficientnet_lite0", 2, settings)
    unfrozen = set(unfrozen_layer_paths(spec, backbone, "top1"))
    assert unfrozen == {"top_conv", "top_bn", "top_activation"} and dim == 1280
    before = _variables_by_layer(model)
    x = image_arrays(dataset, np.arange(len(dataset)), spec.input_size, progress=False)
    compile_and_fit(model, x, dataset.labels, optimizer=make_optimizer(backbone, settings), epochs=1, batch_size=4, seed=0, progress=False)
    after = _variables_by_layer(model)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    frozen_paths = {v.path for v in model.weights if v.path.split("/")[0] not in unfrozen | {"head_classifier"}}
    assert frozen_paths and not (changed & frozen_paths)  # BatchNorm statistics of frozen blocks included
    assert any(p.startswith("top_conv") for p in changed) and any(p.startswith("head_classifier") for p in changed)
    # The one policy: "frozen" keeps the unfrozen block's BatchNorm in inference mode (statistics and scales
    # as pretrained), "train" trains it and updates its statistics.
    top_bn = {p for p in before if p.startswith("top_bn")}
    assert len(top_bn) == 4 and (top_bn <= changed) == (batchnorm == "train") and not (top_bn & changed) == (batchnorm == "frozen")


def test_finetune_rows_are_keyed_by_their_settings(tmp_path):
    """EPOCHS=1, then EPOCHS=2, then EPOCHS=2 again: two rows, each saying its settings; the rerun replaces its own."""
    from classify.results import read_predictions
    from transfer.finetune import FinetuneSettings, run_finetune

    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 6, "test": 3})
    dataset = load_dataset(f"folder:{tree}")
    results = tmp_path / "results"
    rows = [run_finetune(dataset, "efficientnet_lite0", FinetuneSettings(train="head", epochs=epochs, batch_size=4), results_dir=results,
                         progress=False) for epochs in (1, 2, 2)]
    table = pd.read_csv(results / "results.csv")
    assert len(table) == 2 and list(table["layer"]) == ["finetune:head"] * 2 and set(table["kind"]) == {"finetune"}
    assert sorted("epochs=1" in s.split() for s in table["settings"]) == [False, True]
    assert all({"learning_rate=0.001", "batchnorm=frozen", "backbone_lr_scale=0.1", "init_from="} <= set(s.split()) for s in table["settings"])
    assert rows[1]["settings"] == rows[2]["settings"] != rows[0]["settings"]
    for row in rows[:2]:  # the report finds each row's predictions from the row it reads back, and they are its numbers
        stored = table[table["settings"] == row["settings"]].iloc[0]
        predictions = read_predictions(results, stored)
        assert len(predictions) == row["n_test"] == 6
        assert row["top1"] == pytest.approx(np.mean(predictions["label"] == predictions["predicted"]))


@pytest.mark.parametrize("settings, values, message", [
    (FinetuneSettings, {"learning_rate": 0.0}, "fine-tuning: learning_rate=0.0 must be a number in (0, inf)"),
    (FinetuneSettings, {"backbone_lr_scale": -0.1}, "fine-tuning: backbone_lr_scale=-0.1 must be a number in [0, inf)"),
    (FinetuneSettings, {"dropout": -0.2}, "fine-tuning: dropout=-0.2 must be a number in [0, 1)"),
    (FinetuneSettings, {"batchnorm": "moving"}, "batchnorm='moving' is not one of ('frozen', 'train')"),
    (RecipeSettings, {"input_size": 30}, "the recipe: input_size=30 must be a multiple of 4"),
    (RecipeSettings, {"input_size": 0}, "the recipe: input_size=0 must be a whole number in [4, inf)"),
    (RuleSettings, {"learning_rate": -1e-3}, "the rule of thumb: learning_rate=-0.001 must be a number in (0, inf)"),
    (RuleSettings, {"backbone_lr_scale": -1.0}, "the rule of thumb: backbone_lr_scale=-1.0 must be a number in [0, inf)"),
    (RuleSettings, {"dropout": 1.5}, "the rule of thumb: dropout=1.5 must be a number in [0, 1)"),
    (RuleSettings, {"sizes": (5, 2.5)}, "the rule of thumb: sizes=(5, 2.5) must be images per class, one or more whole numbers in [1, inf)"),
    (RuleSettings, {"batchnorm": "moving"}, "batchnorm='moving' is not one of ('frozen', 'train')"),
])
def test_every_transfer_setting_is_checked_where_it_is_declared(settings, values, message):
    """A value out of range is refused when the settings are made, in one line naming it and the range."""
    with pytest.raises(UserError) as refused:
        settings(**values)
    assert message in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_recipe_input_size_the_autoencoder_cannot_halve_twice_is_refused_before_any_image_is_read(tmp_path, capsys):
    """`make recipe` with --input-size 30: one line from the settings, before the dataset (absent here) is opened."""
    from transfer.cli import main

    code = main(["recipe", "--dataset", f"folder:{tmp_path / 'absent'}", "--input-size", "30", "--results-dir", str(tmp_path / "results"),
                 "--models-dir", str(tmp_path / "models"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: the recipe: input_size=30 must be a multiple of 4 (the autoencoder halves the image twice), e.g. 28"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_original_recipe_autoencoder_restore_freeze_train(tmp_path):
    """Pretrain the CAE without labels, restore conv1/conv2 into the classifier, freeze them,
    train the dense layers; then its encoder extracts as ``cae:PATH``."""
    from transfer.recipe import RecipeSettings, pretrain_cae, train_classifier
    from transfer.training import image_arrays

    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 12, "test": 4}, size=28)
    dataset = load_dataset(f"folder:{tree}")
    settings = RecipeSettings(input_size=28, pretrain_epochs=3, train_epochs=2, batch_size=8)
    images = image_arrays(dataset, np.arange(len(dataset)), 28, progress=False)
    checkpoint, losses = pretrain_cae(images, tmp_path / "models" / "cae-shapes.keras", settings, progress=False)
    assert checkpoint.is_file() and losses[-1] < losses[0]  # it learns to reconstruct
    _, again = pretrain_cae(images, tmp_path / "models" / "again.keras", settings, progress=False)
    assert again == losses  # seeded: initial weights and shuffling

    autoencoder = keras.saving.load_model(checkpoint)
    row, classifier = train_classifier(dataset, checkpoint, settings, results_dir=tmp_path / "results", progress=False)
    for name in ("conv1", "conv2"):  # restored, then frozen through training: bit-identical
        assert not classifier.get_layer(name).trainable
        for a, b in zip(classifier.get_layer(name).get_weights(), autoencoder.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    scratch_row, scratch = train_classifier(dataset, None, settings, results_dir=tmp_path / "results", progress=False)
    assert not np.array_equal(scratch.get_layer("conv1").get_weights()[0], autoencoder.get_layer("conv1").get_weights()[0])
    table = pd.read_csv(tmp_path / "results" / "results.csv")
    assert set(table["features"]) == {"cae-recipe", "scratch-cnn"}

    featurizer = CNNFeaturizer(f"cae:{checkpoint}", batch_size=4)
    assert featurizer.name == "cae-cae-shapes" and featurizer.taps == ["conv1", "conv2", "code"]
    out = featurizer([featurizer.prepare(image) for image in images[:3]])
    encoder = keras.Model(autoencoder.inputs, autoencoder.get_layer("code").output)
    np.testing.assert_allclose(out["code"], np.asarray(encoder(images[:3].astype("float32"))), rtol=1e-5, atol=1e-6)
    random = CNNFeaturizer(f"cae:{checkpoint}", weights="random", batch_size=4)
    assert random.weights["weights"] == "random"
    assert not np.allclose(random([featurizer.prepare(images[0])])["code"], out["code"][:1])


@pytest.mark.slow
def test_recipe_command_puts_all_three_side_by_side_in_results_csv(tmp_path):
    """`make recipe` as a command: pretraining, restored + frozen, scratch and linear probes in one results.csv."""
    import subprocess
    import sys

    from conftest import ROOT

    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 12, "test": 4}, size=28)
    done = subprocess.run(
        [sys.executable, "-m", "transfer", "recipe", "--dataset", f"folder:{tree}", "--pretrain-epochs", "1", "--epochs", "1",
         "--batch-size", "8", "--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features"),
         "--results-dir", str(tmp_path / "results"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "conv restored from the autoencoder, frozen; dense trained" in done.stdout
    table = pd.read_csv(tmp_path / "results" / "shapes" / "results.csv")
    assert {"cae-recipe", "scratch-cnn", "cae-cae-shapes"} <= set(table["features"])
    assert list(table.loc[table["features"] == "cae-cae-shapes", "layer"]) == ["conv1", "conv2", "code"]
    assert (tmp_path / "models" / "cae-shapes.keras").is_file()
    assert (tmp_path / "features" / "shapes" / "cae-cae-shapes.h5").is_file()
