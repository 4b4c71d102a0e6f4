"""Generator / discriminator: shapes, custom layers, .keras round trip, FLOPs count (tiny nets)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from srgan.config import DiscriminatorConfig, GeneratorConfig, section
from srgan.models import (
    BicubicUpsample,
    PixelShuffle,
    build_discriminator,
    build_generator,
    generator_flops,
    load_generator,
)

TINY_G = dict(blocks=1, filters=4)
TINY_D = section(DiscriminatorConfig, filters=2, dense=8, batch_norm=True)


def _lr(batch: int = 2, h: int = 5, w: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, h, w, 3), dtype=np.float32)


def _perturb(model: keras.Model, seed: int = 1) -> None:
    """Randomise every weight (incl. BN statistics, PReLU slopes) so a round trip proves they are saved."""
    rng = np.random.default_rng(seed)
    new = []
    for v in model.weights:
        w = v.numpy()
        w = w + 0.2 * rng.standard_normal(w.shape).astype(w.dtype)
        if "variance" in v.path:
            w = np.abs(w) + 0.5
        new.append(w)
    model.set_weights(new)


def test_pixel_shuffle_matches_tf_depth_to_space():
    x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 3, 4, 12)
    out = PixelShuffle(2)(x)
    np.testing.assert_array_equal(out, tf.nn.depth_to_space(x, 2))
    assert PixelShuffle(3).compute_output_shape((None, None, 5, 18)) == (None, None, 15, 2)


@pytest.mark.parametrize(
    "scale,batch_norm,bicubic_skip",
    [(2, False, True), (3, True, False), (4, True, True), (4, False, False)],
)
def test_generator_output_shapes(scale, batch_norm, bicubic_skip):
    cfg = section(GeneratorConfig, **TINY_G, batch_norm=batch_norm, bicubic_skip=bicubic_skip, upsampler="paper")
    g = build_generator(cfg, scale)
    assert g.name == "generator"
    assert g.input_shape == (None, None, None, 3)
    for h, w in [(5, 6), (3, 4)]:  # any LR size, same model
        assert tuple(g(_lr(2, h, w)).shape) == (2, h * scale, w * scale, 3)
    names = [layer.name for layer in g.layers]
    assert any(n.startswith("res0_bn") for n in names) == batch_norm
    assert ("bicubic" in names) == bicubic_skip
    assert sum(isinstance(layer, PixelShuffle) for layer in g.layers) == (2 if scale == 4 else 1)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_light_upsampler_has_no_hr_conv(scale, tmp_path):
    g = build_generator(section(GeneratorConfig, **TINY_G, upsampler="light"), scale)
    x = _lr(2, 5, 6)
    assert tuple(g(x).shape) == (2, 5 * scale, 6 * scale, 3)
    # every conv runs at LR resolution: one pixel shuffle straight to RGB
    assert [layer.block_size for layer in g.layers if isinstance(layer, PixelShuffle)] == [scale]
    assert g.get_layer("output_conv").filters == 3 * scale * scale
    # zero-initialised last conv + bicubic skip: the untrained generator is bicubic
    np.testing.assert_allclose(g(x), tf.image.resize(x, (5 * scale, 6 * scale), method="bicubic"), atol=1e-6)
    _perturb(g)
    g.save(tmp_path / "g.keras")
    np.testing.assert_array_equal(load_generator(tmp_path / "g.keras")(x), g(x))


def test_generator_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        build_generator(section(GeneratorConfig, **TINY_G), 5)


def test_generator_zero_last_conv_equals_bicubic():
    g = build_generator(section(GeneratorConfig, **TINY_G, bicubic_skip=True), 4)
    conv = g.get_layer("output_conv")
    conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    x = _lr(2, 5, 6)
    expected = tf.image.resize(x, (20, 24), method="bicubic")  # independent reference
    np.testing.assert_allclose(g(x), expected, atol=1e-6)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_generator_keras_round_trip(tmp_path, batch_norm):
    g = build_generator(section(GeneratorConfig, **TINY_G, batch_norm=batch_norm, bicubic_skip=True), 3)
    _perturb(g)
    path = tmp_path / "generator.keras"
    g.save(path)
    loaded = load_generator(path)
    x = _lr(2, 4, 5)
    np.testing.assert_array_equal(loaded(x), g(x))
    assert loaded.name == "generator"
    # explicit safe_mode=True load (what evaluate/inference do) works the same
    again = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(again(x), g(x))


def test_custom_layers_serialise():
    for layer in (PixelShuffle(3, name="ps"), BicubicUpsample(2, name="bi")):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
        assert keras.saving.get_registered_name(type(layer)).startswith("srgan>")


def test_discriminator_shape_and_layout():
    d = build_discriminator(TINY_D, 16)
    out = d(_lr(3, 16, 16))
    assert tuple(out.shape) == (3, 1)
    convs = [layer for layer in d.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [2, 2, 4, 4, 8, 8, 16, 16]
    assert [c.strides[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in d.layers) == 7
    assert d.get_layer("dense").units == 8
    assert d.get_layer("logits").activation is keras.activations.linear
    no_bn = build_discriminator(section(DiscriminatorConfig, filters=2, dense=8, batch_norm=False), 16)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in no_bn.layers)


def test_discriminator_keras_round_trip(tmp_path):
    d = build_discriminator(TINY_D, 16)
    _perturb(d)
    path = tmp_path / "discriminator.keras"
    d.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = _lr(2, 16, 16)
    np.testing.assert_array_equal(loaded(x), d(x))


def test_flops_hand_count_tiny_conv_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)  # 8x8 out
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same")(x)  # 4x4 out
    x = keras.layers.Conv2D(5, 3, padding="valid")(x)  # 2x2 out
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(7)(x)
    model = keras.Model(inp, x)
    hand = 2 * (8 * 8 * 9 * 3 * 4 + 4 * 4 * 9 * 4 * 6 + 2 * 2 * 9 * 6 * 5 + 20 * 7)
    assert generator_flops(model, (8, 8)) == hand
    assert generator_flops(model, (8, 8, 3)) == hand
    assert generator_flops(model, (3, 8, 8, 3)) == 3 * hand


def test_flops_hand_count_generator():
    f, h, w = 4, 5, 6
    g = build_generator(section(GeneratorConfig, blocks=1, filters=f, batch_norm=True, bicubic_skip=True,
                                        upsampler="paper"), 2)
    p = h * w
    hand = 2 * (
        p * 81 * 3 * f  # input 9x9
        + 2 * p * 9 * f * f  # residual block, two 3x3
        + p * 9 * f * f  # trunk 3x3
        + p * 9 * f * 4 * f  # sub-pixel conv to 4f
        + 4 * p * 81 * f * 3  # output 9x9 at 2x resolution
    )
    assert generator_flops(g, (h, w)) == hand
    light = build_generator(section(GeneratorConfig, blocks=1, filters=f, bicubic_skip=True, upsampler="light"), 2)
    # same trunk; the head is one 3x3 conv to 3 * 2^2 channels at LR resolution
    assert generator_flops(light, (h, w)) == 2 * (p * 81 * 3 * f + 3 * p * 9 * f * f + p * 9 * f * 12)
