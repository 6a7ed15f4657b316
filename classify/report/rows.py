"""What a report is drawn from: the stores of a dataset, read once, and the rows of results.csv it
ranks (the given split, or the mean over whole-source transfers), chosen by CV score."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from classify.evaluate import store_fingerprint_id
from classify.results import PROBE_KINDS, best_per
from extract.store import FeatureStore, StoreError

log = logging.getLogger(__name__)


def read_stores(features_dir: Path | None, dataset: str) -> list[dict]:
    """Name, size, run record, fingerprint (and its id) and taps of each store of the dataset, read once."""
    stores = []
    for path in sorted((features_dir / dataset).glob("*.h5")) if features_dir else []:
        try:
            with FeatureStore(path, dataset=dataset) as store:
                stores.append({"extractor": store.extractor, "images": len(store), "run": store.run, "fingerprint": store.fingerprint,
                               "fingerprint_id": store_fingerprint_id(store.fingerprint, store.dataset_digest), "taps": store.taps})
        except (StoreError, OSError) as error:
            log.warning("leaving %s out of the report: %s", path, error)
    return stores


def chosen_per(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Probe rows: per group of ``by``, the one with the best CV score; trained models' rows as they are."""
    probes = rows[rows["kind"].isin(PROBE_KINDS)]
    chosen = best_per(probes, by) if len(probes) else probes
    return pd.concat([chosen, rows[~rows["kind"].isin(PROBE_KINDS)]], ignore_index=True)


def _mean_over_protocols(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (features, layer, classifier): metrics averaged over the protocols."""
    keys = ["dataset", "features", "kind", "views", "recipe", "layer", "layer_depth", "classifier", "normalization", "search", "Cs"]
    numeric = ["top1", "mean_per_class_acc", "cv_score", "C", "n_train", "n_test", "n_features", "fit_seconds",
               "images_without_features", "classes_unseen_in_train"]
    mean = rows.groupby(keys, as_index=False, dropna=False)[numeric].mean()
    counts = ["n_train", "n_test", "n_features", "images_without_features", "classes_unseen_in_train"]
    mean[counts] = mean[counts].round().astype(int)
    count = rows.groupby(keys, dropna=False)["protocol"].nunique().iloc[0]
    return mean.assign(protocol=f"mean of {count} transfers", train_split="source", test_split="target",
                       converged=rows.groupby(keys, dropna=False)["converged"].all().to_numpy(), mAP=np.nan, mAP_voc07=np.nan,
                       selection=rows.groupby(keys, dropna=False)["selection"].first().astype(str).to_numpy() + " on each source domain")


def main_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows a dataset is ranked by: the given split, or for domain datasets the mean over the
    whole-source transfers."""
    given = results[results["protocol"] == "given"]
    transfers = results[results["protocol"].str.startswith("transfer:")]
    return _mean_over_protocols(transfers) if given.empty and len(transfers) else given


def describe(row) -> str:
    """features / layer / classifier, and the normalisation where it is not the standard one."""
    normalization = row.get("normalization")
    extra = f" ({normalization})" if isinstance(normalization, str) and normalization not in ("standard", "none") else ""
    return f"{row['features']} / {row['layer']} / {row['classifier']}{extra}"


def is_random_weights(fingerprint: dict) -> bool:
    """A random-weights control (``WEIGHTS=random``): the network untrained, known by its fingerprint
    whatever its store is named."""
    return fingerprint.get("weights") == "random"


def _settings_but_weights(fingerprint: dict) -> dict:
    """What made a CNN store less its weights: the backbone's weights record (``weights*``; a
    saved model's ``architecture``), the seed of a random start, and the package versions."""
    return {k: v for k, v in fingerprint.items() if not k.startswith("weights") and k not in ("seed", "architecture", "versions")}


def weights_pairs(stores: list[dict]) -> list[tuple[dict, dict]]:
    """(pretrained store, random-weights store) of the same backbone and settings but the weights."""
    controls = [s for s in stores if is_random_weights(s["fingerprint"])]
    return [(pretrained, control) for control in controls for pretrained in stores
            if not is_random_weights(pretrained["fingerprint"]) and "model" in pretrained["fingerprint"]
            and _settings_but_weights(pretrained["fingerprint"]) == _settings_but_weights(control["fingerprint"])]


def headline_rows(given: pd.DataFrame, stores: list[dict]) -> pd.DataFrame:
    """The rows the headline is chosen among: ``given`` less the rows of random-weights stores (a
    control for transfer, not a transfer), unless none of the others has a CV score to choose by."""
    controls = {s["extractor"] for s in stores if is_random_weights(s["fingerprint"])}
    transfers = given[~given["features"].isin(controls)]
    return transfers if transfers["cv_score"].notna().any() else given
