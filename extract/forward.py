"""A feature model's forward pass over any number of images, shared by every CNN featurizer.

``forward`` is compiled for one static batch shape: a call with fewer images is padded to it (no
retracing on the last batch), one with more runs in several passes; the views of each image run in
the same pass and their pooled features are averaged into its row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def forward_in_batches(forward: Callable[[np.ndarray], dict], batch, *, batch_size: int, view_count: int,
                       taps: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows of float32 features per tap for ``batch``: (N, S, S, 3), or (N, views, S, S, 3)."""
    batch = np.stack(batch) if isinstance(batch, list) else batch
    if len(batch) > batch_size:
        parts = [forward_in_batches(forward, batch[start : start + batch_size], batch_size=batch_size, view_count=view_count,
                                    taps=taps) for start in range(0, len(batch), batch_size)]
        return {name: np.concatenate([part[name] for part in parts]) for name in taps}
    n = len(batch)
    if n < batch_size:  # pad to one static shape: no retracing on the last batch
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    if view_count > 1:  # (images, views, S, S, 3): every view of the batch in one forward pass
        batch = batch.reshape(-1, *batch.shape[2:])
    # Pixels are whole numbers in [0, 255]: uint8 holds them exactly, and the model casts them.
    outputs = forward(batch if batch.dtype == np.uint8 else batch.astype(np.float32))
    if view_count == 1:
        return {name: np.asarray(outputs[name][:n], dtype=np.float32) for name in taps}
    return {name: outputs[name].reshape(-1, view_count, outputs[name].shape[-1])[:n].mean(axis=1, dtype=np.float64)
            .astype(np.float32) for name in taps}
