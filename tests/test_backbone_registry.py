"""Every registered backbone builds and has the taps it declares: the layer, its channels and its stride.

Built with random weights (``WEIGHTS=random``), so nothing is downloaded and no weights file is
needed: EfficientNet-Lite3 and Lite4, which have no packaged weights, are built too.
"""

from __future__ import annotations

import math

import pytest

from extract.backbones import get_backbone, list_backbones, tap_tensor


@pytest.mark.slow  # 1 to 5 s a backbone
@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_with_the_taps_it_declares(name):
    spec = get_backbone(name)
    models = {"build": spec.build("random")}
    if spec.build_inference is not None:  # the BatchNorm-folded model extraction runs keeps the same taps
        models["build_inference"] = spec.build_inference("random")[:2]
    for built, (model, record) in models.items():
        assert record == {"weights": "random"}, built
        assert model.input_shape == (None, spec.input_size, spec.input_size, 3), built
        for info in spec.feature_info:
            shape = tuple(tap_tensor(model, info.layer).shape)
            assert shape[-1] == info.channels, (built, info, shape)
            if len(shape) == 4:  # a feature map: the input's side over the stride, rounded up ("same" padding)
                assert shape[1:3] == (math.ceil(spec.input_size / info.stride),) * 2, (built, info, shape)
