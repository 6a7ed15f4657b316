"""The store's constants, its errors and the one comparison of settings (fingerprints); the schema
itself is described in ``extract.store``."""

from __future__ import annotations

import json

import h5py

from extract.errors import UserError

SCHEMA_VERSION = 1
STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20
GZIP_LEVEL = 4
MANIFEST = "manifest.json"
CHECKPOINT_SECONDS = 20.0  # a writer stores a shard at least this often: at most this much work is redone after a kill
PLAIN_FILTERS = frozenset({h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32})


class StoreError(UserError):
    """A feature store is unreadable, incomplete or of another schema. Names the file."""


class StoreMismatchError(StoreError):
    """Features would be mixed with features made under other settings or for other images."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fingerprint_differences(expected: dict, found: dict) -> list[str]:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: {found.get(k)!r} in the store, {expected.get(k)!r} now" for k in keys if expected.get(k) != found.get(k)]


def check_same_settings(expected: dict, found: dict, *, subject: str, fix: str) -> None:
    """Raise ``StoreMismatchError`` listing every setting in which ``found`` differs from
    ``expected``: ``subject`` says whose settings, ``fix`` what to do."""
    differences = fingerprint_differences(expected, found)
    if differences:
        raise StoreMismatchError(f"{subject}:\n  " + "\n  ".join(differences) + f"\n{fix}")
