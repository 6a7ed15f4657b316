"""The HDF5 feature store: the one contract between ``extract/``, ``baselines/`` and ``classify/``.

Schema version 1. One file per dataset and extractor: ``features/<dataset>/<extractor>.h5``.

==================  ==========  =============================================================
path                shape/type  meaning
==================  ==========  =============================================================
/index/path         (N,) utf-8  stable identifier of each image: its path relative to the
                                dataset root, or ``file#row`` for array datasets
/index/label        (N,) int64  class index into /classes
/index/split        (N,) utf-8  split name: "train", "test", "val", a domain name...
/index/multilabel   (N, C) i8   multi-label datasets only (VOC): 1 present, 0 absent,
                                -1 difficult (ignored when scoring); /index/label then
                                holds one present class per image
/classes            (C,) utf-8  class names in label order
/layers/<tap>       (N, D) f32  one feature matrix per tapped layer (or baseline variant),
                                chunked by rows, gzip-compressed with byte shuffle
/stats/<name>       (N,) f32    optional per-image diagnostics of an extractor, e.g.
                                ``n_descriptors`` of a bag of words (0: all-zero features)
/skipped/path       (K,) utf-8  images left out under ``--on-error skip`` (K may be 0)
/skipped/reason     (K,) utf-8  why each one was left out
==================  ==========  =============================================================

Root attributes:

* ``schema_version``: 1
* ``dataset``: the dataset's folder name; ``extractor``: the backbone or baseline name
* ``fingerprint``: JSON of everything that determined the features: model, weights
  SHA-256, input size, preprocessing, pooling, taps, package versions
* ``taps``: JSON list of the layer names in /layers, from low to high
* ``dataset_digest``: SHA-256 of the ordered (path, label, split) list the store was made for
* ``index_digest``: the same digest of the index the store holds (``dataset_digest`` less the
  skipped images); the reader checks it against the index it reads (a store written before it
  existed: ``dataset_digest``, when no image was skipped)
* ``dataset_info``: JSON: where the images came from, subset size and seed
* ``complete``: true; a store is only ever published complete (see below)
* ``created``: ISO-8601 UTC time of publication
* ``run`` (optional): JSON of the run that finished the store: ``seconds`` of wall time,
  ``images`` computed in it, ``resumed_from`` (rows already done), ``images_per_second``,
  ``environment`` (``extract.environment.machine_environment``: host, CPU, GPUs, backend and
  package versions of the machine that computed it; with ``ray_workers``, the driver's; stores
  made before 0.2.1 have none). A record only: it is not compared when the store is read

Crash safety. HDF5 files can be left unreadable when a writer dies mid-write, so no
HDF5 file is ever written in place. Rows are computed into shards in
``<store>.partial/``; each shard is written to a temporary file, fsync'ed and renamed,
so a kill at any moment leaves only whole shards, and a rerun computes only the rows
that no shard holds. When every row is done, the shards are assembled into a temporary
HDF5 file that is fsync'ed and renamed over the store path. The file at the store path
is therefore always a complete store, old or new.

One writer at a time. A writer holds an exclusive ``fcntl.flock`` on ``<store>.lock``
(which holds its PID) from opening to publishing; a second writer of the same store is
refused with ``StoreLockedError`` naming that PID. The kernel drops the lock when its
process dies, so a killed writer's lock is taken over by the next run, which also
removes the temporary files (``.<store>.tmp-*``) a kill during assembly left behind.
A ``.partial/`` shard that repeats rows of another is discarded (its other rows are
redone); ``overwrite`` discards the whole ``.partial/`` folder. A ``.partial/`` of other settings
that holds no shard (its run stopped before a row was stored) is discarded without asking.

Modules: ``schema`` (constants, errors, the settings comparison), ``reader`` (``FeatureStore``),
``writer`` (``StoreWriter``), ``lock`` (``StoreLock``), ``chunks`` (parallel gzip). Import the
public names from here.
"""

from extract.store.lock import StoreLock
from extract.store.reader import FeatureStore
from extract.store.schema import (
    CHECKPOINT_SECONDS, CHUNK_BYTES, SCHEMA_VERSION, StoreError, StoreLockedError, StoreMismatchError, canonical_json, check_same_settings,
    fingerprint_differences,
)
from extract.store.writer import StoreWriter

__all__ = ["CHECKPOINT_SECONDS", "CHUNK_BYTES", "SCHEMA_VERSION", "FeatureStore", "StoreError", "StoreLock", "StoreLockedError", "StoreMismatchError", "StoreWriter",
           "canonical_json", "check_same_settings", "fingerprint_differences"]
