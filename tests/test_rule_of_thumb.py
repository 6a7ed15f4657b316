"""The rule-of-thumb experiment: cached activations train exactly like the frozen network, every
regime sees the same draws, finished runs are not redone, and a run repeats exactly."""

from __future__ import annotations

import subprocess

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, make_image_tree
from extract.backbones import get_backbone, tap_tensor
from transfer.finetune import unfrozen_layer_paths
from transfer.layers import apply_batchnorm_policy, set_trainable
from transfer.rule_of_thumb import RuleSettings, Trainable, _fit, cut_layer


def test_training_the_top_block_on_cached_activations_is_training_the_frozen_network():
    """One SGD step of top1 + head on the whole network (lower layers frozen, BatchNorm in inference
    mode) and one on the activations cached at the cut give the same weights."""
    spec = get_backbone("efficientnet_lite0")
    keras.utils.set_random_seed(0)
    backbone, _ = spec.build("random")
    set_trainable(backbone, ["*"], False)
    set_trainable(backbone, unfrozen_layer_paths(spec, backbone, "top1"), True)
    assert apply_batchnorm_policy(backbone, "frozen") > 0
    cut, top = tap_tensor(backbone, cut_layer(spec, backbone, "top1")), tap_tensor(backbone, spec.feature_info[-1].layer)
    assert cut_layer(spec, backbone, "top1") == spec.feature_info[-2].layer  # stage7 ends the last frozen block
    head = keras.layers.Dense(3, activation="softmax")
    pool = keras.layers.GlobalAveragePooling2D()
    whole = keras.Model(backbone.inputs, head(pool(top)))
    upper = keras.Model(cut, top)
    inputs = keras.Input(cut.shape[1:])
    cached = keras.Model(inputs, head(pool(upper(inputs))))
    images = np.random.default_rng(0).uniform(0, 255, (6, 224, 224, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2])
    activations = keras.Model(backbone.inputs, cut).predict(images, verbose=0)
    start = whole.get_weights()
    results = []
    for model, x in ((whole, images), (cached, activations)):  # the two share every layer
        whole.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", jit_compile=False)
        model.train_on_batch(x, labels)
        results.append(whole.get_weights())
    trained = [i for i, (a, b) in enumerate(zip(start, results[0])) if not np.array_equal(a, b)]
    assert trained  # the step changed the top block and the head ...
    assert len(trained) < len(start) // 4  # ... and nothing below the cut
    for before, after_whole, after_cached in zip(start, *results):
        np.testing.assert_allclose(after_cached, after_whole, rtol=1e-4, atol=1e-5)


def test_a_run_gives_the_same_weights_whatever_ran_before_it_in_the_process():
    """A regime's compiled model serves every (size, seed) run after ``reset(seed)``: weights, optimizer
    and dropout's random state all go back, so a resumed or a one-size run repeats an uninterrupted one."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 16)).astype("float32"), np.arange(48) % 3

    def compiled() -> Trainable:
        keras.utils.set_random_seed(0)
        inputs, head = keras.Input((16,)), keras.layers.Dense(3, activation="softmax")
        model = keras.Model(inputs, head(keras.layers.Dropout(0.5)(inputs)))
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", jit_compile=False)
        return Trainable("head", model, head, x, "cut", 4, model.get_weights())

    def run(trainable: Trainable, seed: int) -> list:
        trainable.reset(seed)
        _fit(trainable.model, x, y, seed, 3, RuleSettings())
        return trainable.model.get_weights()

    alone = run(compiled(), 1)
    used = compiled()
    other = run(used, 0)
    run(used, 2)
    for a, b in zip(alone, run(used, 1)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(alone, other))  # the seed does matter


@pytest.mark.slow
def test_rule_of_thumb_runs_every_regime_on_the_same_draws_and_resumes(tmp_path):
    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 8, "test": 4})
    csv = tmp_path / "results" / "shapes" / "rule_of_thumb.csv"

    def run():
        done = subprocess.run(["make", "--no-print-directory", "rule-of-thumb", f"DATASET=folder:{tree}", "REGIMES=probe,head,top1",
                               "SIZES=2,4,50", "REPEATS=1", "EPOCHS=6", f"RESULTS_DIR={tmp_path / 'results'}"],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    first = run()
    table = pd.read_csv(csv)
    # 50 per class is more than the smallest class has: left out, with a word in the log
    assert "sizes [50] left out: the smallest class has 8 training images" in first.stderr
    assert sorted(zip(table["regime"], table["per_class"])) == sorted((r, k) for r in ("probe", "head", "top1") for k in (2, 4))
    assert (table["n_test"] == 8).all() and set(table["n_train"]) == {4, 8}
    assert set(table.loc[table["regime"] == "probe", "layer"]) <= {info.name for info in get_backbone("efficientnet_lite0").feature_info}
    trained = table["regime"] != "probe"
    assert table.loc[trained & (table["per_class"] == 2), "selection"].str.contains("epochs fixed").all()  # nothing to hold out at 2
    assert table.loc[~trained & (table["per_class"] == 2), "selection"].str.contains("2-fold CV").all()  # a probe can still cross-validate
    assert table.loc[trained & (table["per_class"] == 4), "selection"].str.contains("early stopping").all()
    assert (table[trained].groupby("regime")["trainable_params"].nunique() == 1).all()
    params = table.groupby("regime")["trainable_params"].max()  # a probe's size depends on the tap it chose
    assert params["head"] == 1280 * 2 + 2 and params["probe"] <= params["head"] < params["top1"]
    assert table["top1"].between(0, 1).all() and table.loc[table["per_class"] == 4, "top1"].mean() > 0.6  # circles vs squares

    # a finished run is not redone; a deleted one is redone exactly (seeded end to end)
    again = run()
    assert "6 of 6 runs already in" in again.stderr
    dropped = table[(table["regime"] == "top1") & (table["per_class"] == 4)]
    table.drop(dropped.index).to_csv(csv, index=False)
    run()
    redone = pd.read_csv(csv).set_index(["regime", "per_class"]).loc[("top1", 4)]
    for column in ("top1", "val_score", "epochs", "trainable_params", "layer"):
        assert redone[column] == dropped.iloc[0][column], column


def test_regimes_and_sizes_are_checked():
    from extract.errors import UserError
    from transfer.rule_of_thumb import RuleSettings

    with pytest.raises(UserError, match="regime 'top' is not one of"):
        RuleSettings(regimes=("probe", "top"))
    with pytest.raises(UserError, match=r"sizes=\(0, 5\) must be images per class, one or more whole numbers in \[1, inf\)"):
        RuleSettings(sizes=(0, 5))


def test_the_regimes_the_experiment_accepts_are_the_ones_the_report_orders():
    """One grammar (transfer.analysis): every regime the experiment runs has its place from fewest to most
    layers trained; a name it refuses (a hand-edited table) goes last in the report."""
    from extract.errors import UserError
    from transfer.analysis import regime_depth

    accepted = ["probe", "probe:stage5", "head", "top1", "top2", "top12", "all", "scratch"]
    RuleSettings(regimes=tuple(accepted))
    assert sorted(reversed(accepted), key=regime_depth) == ["probe:stage5", "probe", *accepted[2:]]  # the probes tie, stable
    for refused in ("top", "top0", "probex", "head2", "everything"):
        with pytest.raises(UserError, match=f"regime '{refused}' is not one of probe, probe:<tap>, head"):
            RuleSettings(regimes=(refused,))
        assert regime_depth(refused) > regime_depth("scratch")


def test_epochs_is_not_an_option_of_the_rule_of_thumb(capsys):
    """Its epochs come from early stopping, at most --max-epochs (EPOCHS= in make): --epochs is refused, not ignored."""
    from transfer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["rule-of-thumb", "--epochs", "3"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == "error: unrecognized arguments: --epochs 3"
