"""The rule of thumb, measured: how many layers to train for how much labelled data.

For each size k (images per class) and seed, one seeded draw of k training images per class
is shared by every regime, and every regime is tested on the same test split:

* ``probe``: the linear probe (``classify.probe.LinearProbe``) on the tap with the best
  cross-validation score on the k images; ``probe:<tap>`` fixes the tap;
* ``head``: a softmax layer trained by gradient descent on the frozen top tap (pooled);
* ``top1``, ``top2``, ...: the last N blocks and the head trained, lower layers frozen;
* ``all``: every layer trained (pretrained layers at ``backbone_lr_scale`` times the head's step,
  as ``make finetune``); in every transfer regime BatchNorm layers follow ``batchnorm``
  (``transfer.layers.BATCHNORM_POLICIES``), by default in inference mode, statistics and scales
  frozen (Keras' own advice for fine-tuning on small data);
* ``scratch``: the same architecture from a seeded random initialisation, every layer trained.

No augmentation, so the frozen part of the network computes the same activations every
epoch: ``head`` and ``topN`` train on activations cached once at the cut (the tap that ends
the last frozen block), which is exactly the computation of running the whole network with
those layers frozen (``tests/test_rule_of_thumb.py`` checks a training step both ways), and
many times cheaper (``benchmarks/rule_of_thumb_cache.py``). ``all`` and ``scratch`` run the
network on the images every epoch, within ``max_epochs``.

Nothing is chosen on the test split: the probe's tap and C by cross-validation on the k
images; the gradient-trained regimes' number of epochs by early stopping on a stratified
validation part of the k images (``val_fraction``, at least one per class), after which the
model is trained again from the same start on all k images for that many epochs. With fewer
than ``MIN_PER_CLASS_FOR_VALIDATION`` images per class nothing can be held out, and the
schedule is fixed (``fixed_epochs``). Each finished (regime, size, seed) is a row of
``results/<dataset>/rule_of_thumb.csv`` at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedShuffleSplit

from classify.evaluate import few_shot_rows
from classify.metrics import mean_per_class_accuracy
from classify.probe import DEFAULT_CS, LinearProbe
from classify.results import merge_rows, read_csv, row_keys, update_csv
from extract.backbones import get_backbone, layer_paths, tap_tensor
from extract.datasets.base import choose_splits
from extract.arguments import POSITIVE, SEEDS, check, number
from extract.errors import UserError
from transfer.analysis import REGIME, REGIMES_TEXT
from transfer.finetune import DROPOUTS, LEARNING_RATES, LR_SCALES, unfrozen_layer_paths
from transfer.layers import BATCHNORM_POLICIES, DEFAULT_BATCHNORM, LayerwiseAdam, apply_batchnorm_policy, build_head, count_parameters, set_trainable
from transfer.training import TRAINED_VERSION
from transfer.training import image_arrays

log = logging.getLogger(__name__)

DEFAULT_REGIMES = ("probe", "head", "top1", "top2")
DEFAULT_SIZES = (5, 10, 20, 50, 100)
MIN_PER_CLASS_FOR_VALIDATION = 3
COLUMNS = ["dataset", "model", "regime", "per_class", "seed", "layer", "n_train", "n_test", "top1", "mean_per_class_acc",
           "val_score", "epochs", "selection", "train_seconds", "trainable_params", "settings", "created"]
KEY = ["dataset", "model", "regime", "per_class", "seed", "settings"]


@dataclass(frozen=True)
class RuleSettings:
    model: str = "efficientnet_lite0"
    regimes: tuple[str, ...] = DEFAULT_REGIMES
    sizes: tuple[int, ...] = DEFAULT_SIZES
    repeats: int = 3
    seed: int = 0
    max_epochs: int = 30  # cached regimes; early stopping usually ends them far sooner
    max_epochs_uncached: int = 8  # all, scratch: each epoch runs the whole network on the images
    fixed_epochs: int = 10  # when nothing can be held out
    patience: int = 4
    val_fraction: float = 0.2
    learning_rate: float = 1e-3
    backbone_lr_scale: float = 0.1
    dropout: float = 0.2
    batch_size: int = 32
    batchnorm: str = DEFAULT_BATCHNORM  # transfer.layers.BATCHNORM_POLICIES, in every transfer regime

    def __post_init__(self):
        if not self.regimes:
            raise UserError(f"no regime given (REGIMES=): give one or more of {REGIMES_TEXT}")
        for regime in self.regimes:
            if not REGIME.fullmatch(regime):
                raise UserError(f"regime {regime!r} is not one of {REGIMES_TEXT}")
        if not self.sizes or any(k not in POSITIVE for k in self.sizes):
            raise UserError(f"the rule of thumb: sizes={self.sizes!r} must be images per class, one or more whole numbers in {POSITIVE}")
        for name, allowed in (("repeats", POSITIVE), ("max_epochs", POSITIVE), ("max_epochs_uncached", POSITIVE),
                              ("fixed_epochs", POSITIVE), ("patience", POSITIVE), ("batch_size", POSITIVE), ("seed", SEEDS),
                              ("val_fraction", number(0, 1, closed="neither")), ("learning_rate", LEARNING_RATES),
                              ("backbone_lr_scale", LR_SCALES), ("dropout", DROPOUTS)):
            check("the rule of thumb", name, getattr(self, name), allowed)
        if self.batchnorm not in BATCHNORM_POLICIES:
            raise UserError(f"batchnorm={self.batchnorm!r} is not one of {BATCHNORM_POLICIES}")

    def settings_id(self, dataset_digest: str) -> str:
        """What a row's numbers depend on besides (regime, size, seed): the training settings and the images."""
        fixed = {k: v for k, v in asdict(self).items() if k not in ("regimes", "sizes", "repeats", "seed", "model")}
        return hashlib.sha256(f"{sorted(fixed.items())}{dataset_digest}{TRAINED_VERSION}".encode()).hexdigest()[:12]


@dataclass
class Trunk:
    """The pretrained network cut where each regime's trainable part begins, with activations cached."""

    spec: object
    backbone: keras.Model
    cuts: dict[str, str]  # regime -> layer path whose output feeds its trainable part
    initial: list  # the backbone's pretrained weights, restored before every run


def cut_layer(spec, backbone: keras.Model, regime: str) -> str:
    """The layer whose output the trainable part of ``head`` / ``topN`` starts from: the top tap for
    ``head``, the tap that ends the last frozen block for ``topN`` (as ``make finetune`` counts blocks)."""
    top = spec.feature_info[-1].layer
    if regime == "head":
        return top
    trainable = unfrozen_layer_paths(spec, backbone, regime)
    paths = layer_paths(backbone)
    return paths[paths.index(trainable[0]) - 1]


def _split_for_validation(labels: np.ndarray, fraction: float, seed: int):
    """(fit, validation) positions: at least one image per class held out, stratified and seeded;
    None when some class has too few images to spare one."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if counts.min() < MIN_PER_CLASS_FOR_VALIDATION:
        return None
    n_val = max(len(counts), round(fraction * len(labels)))
    return next(StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed).split(labels, labels))


class RuleOfThumb:
    """Runs the experiment on one dataset; ``run()`` returns the table (also written to ``csv_path``)."""

    def __init__(self, dataset, settings: RuleSettings, *, csv_path: Path, progress: bool = True):
        self.dataset, self.settings, self.csv_path, self.progress = dataset, settings, Path(csv_path), progress
        labels, splits = dataset.labels, np.asarray(dataset.splits)
        train, test = choose_splits(splits)
        self.train_split, self.test_split = train, test
        self.candidates, self.test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test)
        smallest = int(np.bincount(labels[self.candidates]).min())
        self.sizes = tuple(k for k in settings.sizes if k <= smallest)
        if not self.sizes:
            raise UserError(f"{dataset.name}: the smallest class has {smallest} training images, fewer than every size {settings.sizes}; "
                            f"choose SIZES up to {smallest}")
        skipped = sorted(set(settings.sizes) - set(self.sizes))
        if skipped:
            log.info("%s: sizes %s left out: the smallest class has %d training images", dataset.name, skipped, smallest)
        self.settings_id = settings.settings_id(dataset.digest())

    # -- the draws and the images -------------------------------------------------------------
    def draws(self) -> dict[tuple[int, int], np.ndarray]:
        """(size, seed) -> dataset rows: k per class, nested across sizes for one seed."""
        labels = self.dataset.labels
        return {(k, self.settings.seed + r): few_shot_rows(labels, self.candidates, k, self.settings.seed + r)
                for r in range(self.settings.repeats) for k in self.sizes}

    def _done(self) -> set[tuple]:
        if not self.csv_path.is_file():
            return set()
        return set(row_keys(read_csv(self.csv_path), KEY))

    def _key(self, regime: str, k: int, seed: int) -> tuple:
        return tuple(str(v) for v in (self.dataset.name, self.settings.model, regime, k, seed, self.settings_id))

    def run(self) -> pd.DataFrame:
        done = self._done()
        draws = self.draws()
        # grouped by regime: one compiled model per regime serves all its runs
        jobs = [(regime, k, seed) for regime in self.settings.regimes for (k, seed) in draws if self._key(regime, k, seed) not in done]
        if len(jobs) < len(draws) * len(self.settings.regimes):
            log.info("rule of thumb: %d of %d runs already in %s", len(draws) * len(self.settings.regimes) - len(jobs),
                     len(draws) * len(self.settings.regimes), self.csv_path)
        if jobs:
            self._run_jobs(jobs, draws)
        return read_csv(self.csv_path)

    def _run_jobs(self, jobs, draws) -> None:
        spec = get_backbone(self.settings.model)
        keras.utils.set_random_seed(self.settings.seed)
        backbone, _ = spec.build(spec.default_weights)
        needed = np.unique(np.concatenate([draws[(k, seed)] for _, k, seed in jobs] + [self.test_rows]))
        images = image_arrays(self.dataset, needed, spec.input_size, progress=self.progress)
        position = {int(row): i for i, row in enumerate(needed)}
        regimes = {regime for regime, _, _ in jobs}
        cached = self._cache(spec, backbone, images, regimes)
        trunk = Trunk(spec, backbone, {r: cut_layer(spec, backbone, r) for r in regimes if r == "head" or r.startswith("top")},
                      backbone.get_weights())
        models: dict[str, Trainable] = {}
        for regime, k, seed in jobs:
            rows = draws[(k, seed)]
            train_at = np.asarray([position[int(r)] for r in rows])
            test_at = np.asarray([position[int(r)] for r in self.test_rows])
            if not regime.startswith("probe") and regime not in models:
                models.clear()  # regimes share the backbone's layers: one at a time
                models[regime] = self._trainable(regime, trunk, cached, images)
            started = time.perf_counter()
            if regime.startswith("probe"):
                result = self._probe(regime, spec, cached, train_at, test_at, self.dataset.labels[rows], seed)
            else:
                result = self._train(models[regime], train_at, test_at, self.dataset.labels[rows], seed)
            result["train_seconds"] = round(time.perf_counter() - started, 2)
            predicted = result.pop("predicted")
            truth = self.dataset.labels[self.test_rows]
            row = {"dataset": self.dataset.name, "model": spec.name, "regime": regime, "per_class": k, "seed": seed,
                   "n_train": len(rows), "n_test": len(self.test_rows), "top1": float(accuracy_score(truth, predicted)),
                   "mean_per_class_acc": mean_per_class_accuracy(truth, predicted), "settings": self.settings_id,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}
            log.info("rule of thumb: %s, %d per class, seed %d: top-1 %.2f%% (%s)", regime, k, seed, 100 * row["top1"], row["selection"])
            self._save(row)

    def _save(self, row: dict) -> None:
        new = pd.DataFrame([row], columns=COLUMNS)
        update_csv(self.csv_path, lambda old: merge_rows(old, new, key=KEY, sort_by=["regime", "per_class", "seed"]))

    # -- the cache of frozen activations ------------------------------------------------------
    def _cache(self, spec, backbone, images, regimes) -> dict[str, np.ndarray]:
        """One forward pass over every image needed: pooled taps (probe) and the cut of each cached regime."""
        outputs = {}
        if any(r.startswith("probe") for r in regimes):
            for info in spec.feature_info:
                outputs[f"tap:{info.name}"] = _pooled(tap_tensor(backbone, info.layer))
        for regime in regimes:
            if regime == "head":  # the head pools its input first: cache the pooled top tap
                outputs["cut:head"] = _pooled(tap_tensor(backbone, spec.feature_info[-1].layer))
            elif regime.startswith("top"):
                outputs[f"cut:{regime}"] = tap_tensor(backbone, cut_layer(spec, backbone, regime))
        if not outputs:
            return {}
        model = keras.Model(backbone.inputs, outputs)
        parts = [model.predict(images[i : i + 64].astype(np.float32), verbose=0) for i in range(0, len(images), 64)]
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}

    # -- one regime at one size and seed -----------------------------------------------------------
    def _probe(self, regime, spec, cached, train_at, test_at, y, seed) -> dict:
        taps = [info.name for info in spec.feature_info]
        if ":" in regime:
            tap = regime.split(":", 1)[1]
            if tap not in taps:
                raise UserError(f"regime {regime!r}: {spec.name} has no tap {tap!r}; its taps: {', '.join(taps)}")
            taps = [tap]
        fits = {tap: LinearProbe(Cs=DEFAULT_CS, seed=seed).fit(cached[f"tap:{tap}"][train_at], y) for tap in taps}
        scored = {tap: probe.cv_score_ for tap, probe in fits.items() if np.isfinite(probe.cv_score_)}
        tap = max(scored, key=scored.get) if scored else taps[-1]  # nothing held out: the top tap
        probe = fits[tap]
        how = (f"tap by CV score among {len(taps)}" if len(taps) > 1 and scored
               else "tap fixed" if len(taps) == 1 else "top tap (too few images to hold any out)")
        return {"layer": tap, "predicted": probe.predict(cached[f"tap:{tap}"][test_at]), "val_score": probe.cv_score_,
                "epochs": np.nan, "selection": f"{how}; {probe.selection_}",
                "trainable_params": int(probe.pipeline_["classify"].coef_.size + len(probe.classes_))}

    def _trainable(self, regime, trunk, cached, images) -> Trainable:
        """The regime's model, compiled once: new head on cached cut activations (head, topN) or on the
        images (all, scratch), with the regime's layers trainable and the rest frozen."""
        spec, backbone, n_classes = trunk.spec, trunk.backbone, len(self.dataset.classes)
        backbone.set_weights(trunk.initial)
        set_trainable(backbone, ["*"], False)
        if regime in ("all", "scratch"):
            if regime == "scratch":  # the same architecture; its random weights are drawn per run
                backbone, _ = spec.build("random")
            set_trainable(backbone, ["*"], True)
            if regime == "all":
                apply_batchnorm_policy(backbone, self.settings.batchnorm)
            inputs, features = backbone.inputs, tap_tensor(backbone, spec.feature_info[-1].layer)
            scaled = backbone.trainable_weights if regime == "all" else []
            data, layer, max_epochs = images, "input", self.settings.max_epochs_uncached
        else:
            data = cached[f"cut:{regime}"]
            inputs = keras.Input(data.shape[1:], name="cut")
            features, scaled = inputs, []
            if regime != "head":
                set_trainable(backbone, unfrozen_layer_paths(spec, backbone, regime), True)
                apply_batchnorm_policy(backbone, self.settings.batchnorm)
                upper = keras.Model(tap_tensor(backbone, trunk.cuts[regime]), tap_tensor(backbone, spec.feature_info[-1].layer),
                                    name=f"{spec.name}_upper")
                features, scaled = upper(inputs), upper.trainable_weights
            layer, max_epochs = trunk.cuts[regime], self.settings.max_epochs
        outputs, head = build_head(features, n_classes, dropout=self.settings.dropout)
        model = keras.Model(inputs, outputs, name=f"rule_of_thumb_{regime}")
        optimizer = LayerwiseAdam({v.path: self.settings.backbone_lr_scale for v in scaled}, learning_rate=self.settings.learning_rate)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
        return Trainable(regime, model, head, data, layer, max_epochs, model.get_weights(),
                         (spec, backbone) if regime == "scratch" else None)

    def _train(self, trainable: Trainable, train_at, test_at, y, seed) -> dict:
        """Early stopping on a validation part of the k images picks the epochs; then the same start
        trained on all k images for that many epochs. Returns the test predictions and the choices."""
        s = self.settings
        data = trainable.data
        split = _split_for_validation(y, s.val_fraction, seed)
        if split is None:
            epochs, val_score = min(s.fixed_epochs, trainable.max_epochs), np.nan
            how = f"{epochs} epochs fixed (fewer than {MIN_PER_CLASS_FOR_VALIDATION} per class to hold any out)"
        else:
            fit, val = split
            trainable.reset(seed)
            history = _fit(trainable.model, data[train_at[fit]], y[fit], seed, trainable.max_epochs, s,
                           validation=(data[train_at[val]], y[val]))
            epochs = int(np.argmin(history["val_loss"])) + 1
            val_score = float(history["val_accuracy"][epochs - 1])
            how = f"{epochs} epochs by early stopping on {len(val)} held-out images (max {trainable.max_epochs})"
        trainable.reset(seed)
        _fit(trainable.model, data[train_at], y, seed, epochs, s)
        predicted = np.argmax(trainable.model.predict(data[test_at], batch_size=64, verbose=0), axis=1)
        return {"layer": trainable.layer, "predicted": predicted, "val_score": val_score, "epochs": epochs, "selection": how,
                "trainable_params": count_parameters(trainable.model)[0]}


@dataclass
class Trainable:
    """A regime's compiled model and what it trains on; ``reset(seed)`` puts it back to its start."""

    regime: str
    model: keras.Model
    head: keras.layers.Dense
    data: np.ndarray  # cached cut activations, or the images
    layer: str
    max_epochs: int
    start: list  # the model's weights as built: pretrained backbone, initial head
    scratch: tuple | None = None  # (spec, backbone) of scratch: the backbone's random weights are drawn per run

    def __post_init__(self):
        # Variables that are not weights: the random-number states of Dropout's seed generators.
        # set_weights leaves them where the previous run left them, so a run's dropout masks
        # (and its numbers) depended on which runs came before it in the same process.
        weights = {id(v) for v in self.model.weights}
        self.random_states = [v for v in self.model.variables if id(v) not in weights]
        self.random_start = [v.numpy() for v in self.random_states]

    def reset(self, seed: int) -> None:
        """Start weights (seeded: the head, and for scratch the whole network), dropout's random
        states seeded by ``seed``, zero optimizer state; the compiled training function is kept,
        so nothing is traced again. A run's numbers depend on its seed, not on the runs before it."""
        keras.utils.set_random_seed(seed)
        self.model.set_weights(self.start)
        for variable, start in zip(self.random_states, self.random_start):
            variable.assign(start + np.asarray([seed, 0], start.dtype))
        if self.scratch is not None:
            spec, backbone = self.scratch
            fresh, _ = spec.build("random")
            for layer in backbone.layers:
                if layer.weights:
                    layer.set_weights(fresh.get_layer(layer.name).get_weights())
        kernel = self.head.kernel
        limit = np.sqrt(6.0 / sum(kernel.shape))  # Glorot uniform, Keras' default for Dense
        kernel.assign(np.random.default_rng(seed).uniform(-limit, limit, kernel.shape).astype("float32"))
        self.head.bias.assign(np.zeros(self.head.bias.shape, "float32"))
        optimizer = self.model.optimizer
        for variable in optimizer.variables:  # step count and moments; the learning rate stays
            if variable.name != "learning_rate":
                variable.assign(np.zeros(variable.shape, variable.dtype))


def _fit(model, x, y, seed, epochs, settings: RuleSettings, validation=None) -> dict:
    keras.utils.set_random_seed(seed)
    callbacks = [keras.callbacks.EarlyStopping("val_loss", patience=settings.patience)] if validation else []
    return model.fit(x, y, epochs=epochs, batch_size=settings.batch_size, shuffle=True, verbose=0,
                     validation_data=validation, callbacks=callbacks).history


def _pooled(tensor):
    return keras.layers.GlobalAveragePooling2D()(tensor) if len(tensor.shape) == 4 else tensor
