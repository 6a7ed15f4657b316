"""EfficientNet-Lite in Keras: ImageNet sanity and numerical fidelity to the original network.

The reference below is an independent NumPy re-implementation of the original PyTorch
EfficientNet-Lite forward pass (NCHW, float64, TF "SAME" padding as its
Conv2dStaticSamePadding computes it), decoded from the official block strings and run
straight from the state dict. Our Keras model must agree with it on every tap.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from skimage import data

from extract.extractor import CNNFeaturizer
from extract.torch_weights import load_state_dict

OFFICIAL_BLOCKS = ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
                   "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"]
OFFICIAL_PARAMS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}


def _pad_same(x, k, s):
    _, h, w = x.shape
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def _windows(x, k, s):
    return np.lib.stride_tricks.sliding_window_view(_pad_same(x, k, s), (k, k), axis=(1, 2))[:, ::s, ::s]


def _conv(x, w, s):
    return np.einsum("chwij,ocij->ohw", _windows(x, w.shape[-1], s), w, optimize=True)


def _dwconv(x, w, s):
    return np.einsum("chwij,cij->chw", _windows(x, w.shape[-1], s), w[:, 0], optimize=True)


def _pointwise(x, w):
    return np.einsum("chw,oc->ohw", x, w[:, :, 0, 0], optimize=True)


def _bn(x, sd, prefix):
    g, b, m, v = (sd[f"{prefix}.{n}"].astype(np.float64)[:, None, None] for n in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-3) * g + b


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def reference_forward(sd, image_uint8, model_name):
    """Return ({stage_index: pooled output}, stem pooled, pre_logits, logits) of the original network."""
    width, depth = OFFICIAL_PARAMS[model_name]

    def round_filters(f):
        f *= width
        new = max(8, int(f + 4) // 8 * 8)
        return int(new + 8 if new < 0.9 * f else new)

    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = (image_uint8.astype(np.float64).transpose(2, 0, 1) - 127.0) / 128.0
    x = _relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    pooled = {"stem": x.mean(axis=(1, 2))}
    index = 0
    for stage, text in enumerate(OFFICIAL_BLOCKS):
        r, k, s, e, i, o = (int(v) for v in re.findall(r"\d+", text.replace("s11", "s1").replace("s22", "s2")))
        last = stage in (0, len(OFFICIAL_BLOCKS) - 1)
        repeats = r if last else int(math.ceil(depth * r))
        f_in, f_out = (32 if stage == 0 else round_filters(i)), round_filters(o)
        for rep in range(repeats):
            p = f"_blocks.{index}"
            inputs, stride, fin = x, (s if rep == 0 else 1), (f_in if rep == 0 else f_out)
            if e != 1:
                x = _relu6(_bn(_pointwise(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
            x = _relu6(_bn(_dwconv(x, sd[f"{p}._depthwise_conv.weight"], stride), sd, f"{p}._bn1"))
            x = _bn(_pointwise(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
            if stride == 1 and fin == f_out:
                x = x + inputs
            index += 1
        pooled[f"stage{stage + 1}"] = x.mean(axis=(1, 2))
    x = _relu6(_bn(_pointwise(x, sd["_conv_head.weight"]), sd, "_bn1"))
    pooled["pre_logits"] = x.mean(axis=(1, 2))
    logits = sd["_fc.weight"] @ pooled["pre_logits"] + sd["_fc.bias"]
    return pooled, logits


@pytest.fixture(scope="module", params=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def featurizer(request):
    from extract.backbones import get_backbone

    return CNNFeaturizer(request.param, weights="imagenet", batch_size=2, crop_pct=get_backbone(request.param).crop_pct)


def _predict_top1(featurizer, image):
    logits = featurizer.backbone.predict(featurizer.prepare(image)[None].astype(np.float32), verbose=0)[0]
    return int(np.argmax(logits))


def test_imagenet_sanity_cat_and_espresso(featurizer):
    assert 281 <= _predict_top1(featurizer, data.chelsea()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert _predict_top1(featurizer, data.coffee()) == 967  # espresso


def test_taps_match_independent_reference(featurizer):
    from extract.backbones.efficientnet_lite.weights import packaged_weights_path

    image = featurizer.prepare(data.coffee())
    ours = featurizer(image[None])
    reference, logits = reference_forward(load_state_dict(packaged_weights_path(featurizer.spec.name)), image, featurizer.spec.name)
    assert set(ours) == set(reference)
    for tap, expected in reference.items():
        got = ours[tap][0]
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(got - expected).max() <= 1e-4 * scale, f"{featurizer.spec.name} tap {tap} differs from the reference"
    ours_logits = featurizer.backbone.get_layer("predictions").kernel.numpy().T @ ours["pre_logits"][0] + featurizer.backbone.get_layer("predictions").bias.numpy()
    np.testing.assert_allclose(ours_logits, logits, atol=2e-3)


def test_folded_batchnorm_matches_the_unfolded_model_on_every_tap(featurizer):
    """Inference runs BatchNorm folded into the convolutions; the trainable backbone keeps real
    BatchNorm layers, and the two agree on every tap to float32 rounding."""
    import keras

    from extract.backbones import tap_tensor

    assert featurizer.batchnorm_folded and featurizer.fingerprint()["batchnorm"] == "folded"
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in featurizer.model.layers)
    backbone = featurizer.backbone
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers) > 40
    unfolded = keras.Model(backbone.inputs, {info.name: keras.ops.mean(tap_tensor(backbone, info.layer), axis=(1, 2))
                                             for info in featurizer.feature_info})
    images = np.stack([featurizer.prepare(data.coffee()), featurizer.prepare(data.chelsea()),
                       np.random.default_rng(0).integers(0, 256, (featurizer.input_size,) * 2 + (3,), dtype=np.uint8)])
    ours = featurizer(images)
    expected = {k: np.asarray(v) for k, v in unfolded(images.astype(np.float32), training=False).items()}
    assert set(ours) == set(expected) == set(featurizer.taps)
    for tap in featurizer.taps:
        scale = max(1.0, float(np.abs(expected[tap]).max()))
        assert np.abs(ours[tap] - expected[tap]).max() <= 1e-5 * scale, f"{featurizer.spec.name} tap {tap}"


def test_folding_falls_back_for_taps_on_folded_convolutions_and_keeps_random_weights():
    folded = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stage1,stage3", batch_size=2)
    unfolded = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stage1,stage3", batch_size=2, fold_batchnorm=False)
    assert folded.batchnorm_folded and not unfolded.batchnorm_folded and "batchnorm" not in unfolded.fingerprint()
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a, b = folded(images), unfolded(images)
    for tap in ("stage1", "stage3"):
        assert np.abs(a[tap] - b[tap]).max() <= 1e-5 * max(1.0, float(np.abs(b[tap]).max()))
    # A tap on a convolution whose BatchNorm would be folded into it reads the real model.
    conv = CNNFeaturizer("efficientnet_lite0", weights="random", layers="block2a_project_conv,stage2", batch_size=2)
    assert not conv.batchnorm_folded and "batchnorm" not in conv.fingerprint()
    reference = CNNFeaturizer("efficientnet_lite0", weights="random", layers="block2a_project_conv,stage2", batch_size=2,
                              fold_batchnorm=False)
    np.testing.assert_array_equal(conv(images)["block2a_project_conv"], reference(images)["block2a_project_conv"])
