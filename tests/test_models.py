"""Generator / discriminator: shapes, custom layers, .keras round trip, FLOPs count (tiny nets)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from srgan import models
from srgan.config import ConfigError, DiscriminatorConfig, EdsrConfig, GeneratorConfig, RrdbConfig, section
from srgan.models import (
    BICUBIC_RADIUS,
    BicubicUpsample,
    FixedUpsample,
    PixelShuffle,
    bicubic_phase_taps,
    build_discriminator,
    build_generator,
    generator_flops,
    load_generator,
    receptive_radius,
    tile_overlap_warning,
)

TINY_G = dict(blocks=1, filters=4)
TINY_RRDB = section(RrdbConfig, growth=2, dense_layers=3)
ARCHS = ("srresnet", "edsr", "rrdb")
# Conv bicubic vs tf.image.resize: float32 sums in another order (measured max 3.6e-7 on [0, 1]).
BICUBIC_TOL = 1e-5
XLA_TOL = 1e-5  # XLA fuses and reorders float32 sums
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


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_resize_upsampler_keeps_flat_regions_flat(scale, tmp_path):
    """Resize-convolution: every sub-pixel phase shares one kernel, so a trained (random) head
    turns a flat input into a flat output, where the pixel shuffle paints a scale-periodic pattern."""
    for upsampler, periodic in (("resize", False), ("light", True)):
        cfg = section(GeneratorConfig, **TINY_G, upsampler=upsampler, bicubic_skip=True)
        g = build_generator(cfg, scale)
        _perturb(g)
        edge = (receptive_radius(cfg, scale) + 1) * scale  # HR px that see the zero padding
        flat = np.full((1, 2 * receptive_radius(cfg, scale) + 6, 2 * receptive_radius(cfg, scale) + 5, 3), 0.4,
                       np.float32)
        out = np.asarray(g(flat))[0, edge:-edge, edge:-edge]
        spread = float(out.std(axis=(0, 1)).max())
        assert (spread > 1e-3) == periodic, (upsampler, spread)
    assert [layer.name for layer in g.layers if isinstance(layer, PixelShuffle)] == ["output_shuffle"]
    g = build_generator(section(GeneratorConfig, **TINY_G, upsampler="resize"), scale)
    assert not [layer for layer in g.layers if isinstance(layer, PixelShuffle)]
    _perturb(g)
    g.save(tmp_path / "g.keras")
    np.testing.assert_array_equal(load_generator(tmp_path / "g.keras")(_lr(1, 4, 5)), g(_lr(1, 4, 5)))


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
    for layer in (PixelShuffle(3, name="ps"), BicubicUpsample(2, name="bi"), FixedUpsample(4, "bilinear", name="bl")):
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


# --------------------------------------------------------------------------- EDSR / RRDB generators
def _tiny(arch: str, **kw) -> GeneratorConfig:
    """A tiny generator config of ``arch`` (RRDB: growth 2, 3 convs per dense block)."""
    return section(GeneratorConfig, **{**TINY_G, "arch": arch, "rrdb": TINY_RRDB, **kw})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("upsampler", ["light", "resize", "paper"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_every_arch_shapes_and_untrained_is_bicubic(arch, upsampler, scale):
    g = build_generator(_tiny(arch, upsampler=upsampler, bicubic_skip=True, resize_filters=2), scale)
    for h, w in [(5, 6), (3, 4)]:  # any LR size, same model
        x = _lr(2, h, w)
        out = g(x)
        assert out.dtype == "float32" and tuple(out.shape) == (2, h * scale, w * scale, 3)
        # zero-initialised output conv + bicubic skip: the untrained generator *is* bicubic
        bicubic = tf.image.resize(x, (h * scale, w * scale), "bicubic")
        np.testing.assert_allclose(out, bicubic, atol=BICUBIC_TOL)
    no_skip = build_generator(_tiny(arch, upsampler=upsampler, bicubic_skip=False), scale)
    assert "bicubic" not in [layer.name for layer in no_skip.layers]
    assert np.abs(no_skip(x)).max() > 0  # glorot-initialised head without the skip


def test_edsr_layout():
    scaled = section(EdsrConfig, res_scale=0.1)
    g = build_generator(_tiny("edsr", blocks=2, upsampler="paper", edsr=scaled), 4)
    names = {layer.name for layer in g.layers}
    paper_only = (keras.layers.BatchNormalization, keras.layers.PReLU)  # SRResNet's layers
    assert not any(isinstance(layer, paper_only) for layer in g.layers)
    assert g.get_layer("res0_conv1").activation is keras.activations.relu
    assert g.get_layer("res1_scale").scale == 0.1 and "trunk_add" in names
    assert g.get_layer("output_conv").kernel_size == (3, 3)  # EDSR's 3x3 tail, not SRResNet's 9x9
    # res_scale 1 adds no layer
    plain = build_generator(_tiny("edsr"), 4)
    assert not any(isinstance(layer, keras.layers.Rescaling) for layer in plain.layers)


def test_rrdb_layout():
    blocks, f, grow, dense = 2, 4, 2, 3
    rrdb = section(RrdbConfig, growth=grow, dense_layers=dense)
    cfg = _tiny("rrdb", blocks=blocks, upsampler="paper", rrdb=rrdb)
    g = build_generator(cfg, 4)
    convs = [layer for layer in g.layers if isinstance(layer, keras.layers.Conv2D)]
    # input conv, 3 dense blocks x dense_layers convs per RRDB, trunk conv, 2 up convs, HR conv, output
    assert len(convs) == 1 + blocks * 3 * dense + 1 + 2 + 2
    # dense connections: conv k reads the block input and every earlier conv's growth channels
    for k in range(dense):
        conv = g.get_layer(f"rrdb0_rdb0_conv{k}")
        assert conv.input.shape[-1] == f + k * grow
        assert conv.filters == (f if k == dense - 1 else grow)
    assert g.get_layer("rrdb0_rdb2_scale").scale == g.get_layer("rrdb1_scale").scale == cfg.rrdb.res_scale
    assert isinstance(g.get_layer("up1_nearest"), keras.layers.UpSampling2D)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in g.layers)


def test_batch_norm_is_refused_outside_srresnet():
    with pytest.raises(ConfigError, match="model.generator.batch_norm: true is only allowed with arch srr"):
        section(GeneratorConfig, arch="edsr", batch_norm=True)
    with pytest.raises(ConfigError, match="model.generator.arch: 'esrgan' is not allowed"):
        section(GeneratorConfig, arch="esrgan")
    with pytest.raises(ConfigError, match="model.generator.rrdb.res_scale"):
        section(GeneratorConfig, rrdb={"res_scale": 0.0, "growth": 2, "dense_layers": 3})


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_safe_mode_round_trip(arch, tmp_path):
    cfg = _tiny(arch, upsampler="paper", bicubic_skip=True, edsr=section(EdsrConfig, res_scale=0.5))
    g = build_generator(cfg, 3)
    _perturb(g)
    g.save(tmp_path / "g.keras")
    x = _lr(2, 4, 5)
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "g.keras", safe_mode=True)(x), g(x))
    np.testing.assert_array_equal(load_generator(tmp_path / "g.keras")(x), g(x))


def test_flops_hand_count_edsr():
    f, h, w = 4, 5, 6
    p = h * w
    light = build_generator(_tiny("edsr", filters=f), 2)
    trunk = p * 9 * 3 * f + 2 * p * 9 * f * f + p * 9 * f * f  # input 3x3, one block, trunk conv
    assert generator_flops(light, (h, w)) == 2 * (trunk + p * 9 * f * 12)  # 3x3 to 3 * 2^2
    paper = build_generator(_tiny("edsr", filters=f, upsampler="paper"), 4)
    head = p * 9 * f * 4 * f + 4 * p * 9 * f * 4 * f + 16 * p * 9 * f * 3  # two sub-pixel x2, 3x3 tail
    assert generator_flops(paper, (h, w)) == 2 * (trunk + head)


def test_flops_hand_count_rrdb():
    f, g_, h, w = 4, 2, 5, 6
    p = h * w
    model = build_generator(_tiny("rrdb", filters=f, upsampler="paper"), 4)  # 1 RRDB, 3 convs per RDB
    rdb = p * 9 * (f * g_ + (f + g_) * g_ + (f + 2 * g_) * f)  # dense inputs f, f+g, f+2g
    hand = (
        p * 9 * 3 * f  # input 3x3
        + 3 * rdb  # three residual dense blocks
        + p * 9 * f * f  # trunk 3x3
        + 4 * p * 9 * f * f  # nearest x2, 3x3 at 2x
        + 16 * p * 9 * f * f  # nearest x2, 3x3 at 4x
        + 16 * p * 9 * f * f  # HR conv
        + 16 * p * 9 * f * 3  # output conv
    )
    assert generator_flops(model, (h, w)) == 2 * hand


def _measured_radius(g: keras.Model, scale: int, bound: int) -> int:
    """LR px an output pixel depends on, measured: the support of the gradient of one LR
    pixel's HR outputs with respect to the input (random weights, so no dependence cancels)."""
    n = 2 * bound + 5
    c = n // 2
    x = tf.Variable(_lr(1, n, n))
    with tf.GradientTape() as tape:
        y = g(x)
        loss = tf.reduce_sum(tf.square(y[:, c * scale : (c + 1) * scale, c * scale : (c + 1) * scale]))
    rows, cols = np.nonzero(np.abs(tape.gradient(loss, x).numpy()[0]).sum(-1))
    return int(max(np.abs(rows - c).max(), np.abs(cols - c).max()))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("upsampler", ["light", "resize", "resize_narrow", "paper"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_receptive_radius_is_exact(arch, upsampler, scale):
    narrow = {"upsampler": "resize", "resize_filters": 2} if upsampler == "resize_narrow" else {"upsampler": upsampler}
    cfg = _tiny(arch, **narrow)
    if upsampler == "resize_narrow":
        assert cfg.resize_filters < cfg.filters  # the narrowing conv is built
        assert "output_narrow" in {layer.name for layer in build_generator(cfg, scale).layers}
    g = build_generator(cfg, scale)
    _perturb(g)
    radius = receptive_radius(cfg, scale)
    assert _measured_radius(g, scale, radius) == radius


def test_receptive_radius_formulas():
    def r(arch, upsampler, scale, **kw):
        return receptive_radius(section(GeneratorConfig, arch=arch, upsampler=upsampler, **kw), scale)

    for b in (0, 8, 16):
        assert r("srresnet", "paper", 4, blocks=b) == 2 * b + 8  # the bound quoted in params.yaml
        assert r("srresnet", "light", 4, blocks=b, bicubic_skip=False) == 2 * b + 6
        assert r("edsr", "paper", 4, blocks=b) == 2 * b + 4
        assert r("edsr", "light", 4, blocks=b, bicubic_skip=False) == 2 * b + 3
    # ESRGAN at paper size: 23 RRDBs of 3 x 5 chained convs
    assert r("rrdb", "paper", 4, blocks=23, rrdb=section(RrdbConfig, dense_layers=5)) == 3 * 5 * 23 + 4
    # the bicubic skip alone reads 2 px
    assert r("edsr", "light", 2, blocks=0, bicubic_skip=True) == max(3, BICUBIC_RADIUS)


# --------------------------------------------------------------------------- bicubic as a fixed convolution
def test_bicubic_phase_taps():
    for scale in (1, 2, 3, 4, 8):
        taps = bicubic_phase_taps(scale)
        np.testing.assert_allclose(taps.sum(axis=0), 1.0, atol=1e-12)  # Keys is a partition of unity
        assert ((taps != 0).sum(axis=0) <= 4).all()
    # x2: output phases sit at -1/4 and +1/4 LR px, mirror images of each other
    taps = bicubic_phase_taps(2)
    np.testing.assert_allclose(taps[:, 0], taps[::-1, 1])
    np.testing.assert_allclose(taps[:, 1], [0, -0.0703125, 0.8671875, 0.2265625, -0.0234375])


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (5, 6), (7, 9), (16, 16), (33, 17)])
def test_conv_bicubic_equals_tf_resize(scale, h, w):
    x = _lr(2, h, w, seed=h * w + scale)
    out = BicubicUpsample(scale)(x)
    expected = tf.image.resize(x, (h * scale, w * scale), method="bicubic", antialias=False)
    assert tuple(out.shape) == tuple(expected.shape)
    np.testing.assert_allclose(out, expected, rtol=0, atol=BICUBIC_TOL)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (7, 9), (33, 17)])
def test_fixed_bilinear_equals_tf_resize(scale, h, w):
    """The resize upsampler's bilinear step: TF's bilinear resize, border clamp included."""
    x = _lr(2, h, w, seed=h * w + scale)
    out = FixedUpsample(scale, "bilinear")(x)
    expected = tf.image.resize(x, (h * scale, w * scale), method="bilinear", antialias=False)
    np.testing.assert_allclose(out, expected, rtol=0, atol=BICUBIC_TOL)
    with pytest.raises(ValueError, match="kernel must be one of"):
        FixedUpsample(scale, "lanczos")


def test_conv_bicubic_compiles_with_xla():
    spec = tf.TensorSpec((None, None, None, 3))
    for scale in (2, 3, 4):
        layer = BicubicUpsample(scale)
        graph = tf.function(lambda t, layer=layer: layer(t)).get_concrete_function(spec).graph
        assert "ResizeBicubic" not in {op.type for op in graph.get_operations()}  # the op XLA lacks
        x = _lr(1, 7, 8, seed=scale)
        xla = tf.function(lambda t, layer=layer: layer(t), jit_compile=True)
        expected = tf.image.resize(x, (7 * scale, 8 * scale), method="bicubic", antialias=False)
        np.testing.assert_allclose(xla(x), expected, rtol=0, atol=BICUBIC_TOL)
    np.testing.assert_array_equal(BicubicUpsample(1)(_lr()), _lr())  # x1 is the identity


def test_xla_compiles_generator_with_bicubic_skip():
    # RRDB with its own head has every layer kind of the three archs but BN/PReLU (SRResNet)
    g = build_generator(_tiny("rrdb", upsampler="paper", bicubic_skip=True), 4)
    _perturb(g)
    x = _lr(2, 6, 7)
    xla = tf.function(lambda t: g(t, training=False), jit_compile=True)
    np.testing.assert_allclose(xla(x), g(x, training=False), rtol=0, atol=XLA_TOL)
    assert "HloModule" in xla.experimental_get_compiler_ir(tf.constant(x))(stage="hlo")


def test_a_generator_trained_in_mixed_precision_is_saved_to_compute_in_float32(tmp_path):
    """train.precision picks bf16 per machine; the saved file must not carry that choice along."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        g = models.build_generator(section(GeneratorConfig, blocks=1, filters=8), 4)
        assert g.get_layer("trunk_add").dtype_policy.name == "mixed_bfloat16"
        x = np.random.default_rng(0).random((1, 12, 12, 3), np.float32)
        y_bf16 = np.asarray(g(x))
        path = models.save_generator(g, tmp_path / "g.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    loaded = keras.models.load_model(path, safe_mode=True)
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    assert [w.dtype for w in loaded.weights] == [w.dtype for w in g.weights]  # float32 variables either way
    for a, b in zip(loaded.get_weights(), g.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the same function, computed in float32 instead of bf16: bf16's 8-bit mantissa is the difference
    np.testing.assert_allclose(np.asarray(loaded(x)), y_bf16, atol=2e-2)


def test_tile_overlap_warning_names_key_and_radius():
    paper = section(GeneratorConfig, blocks=16, upsampler="paper")  # radius 2 * 16 + 8 = 40
    note = tile_overlap_warning(paper, 4, tile=128, overlap=24)
    assert note is not None and "evaluate.tile_overlap 24" in note and "radius 40" in note
    assert tile_overlap_warning(paper, 4, tile=128, overlap=40) is None
    assert tile_overlap_warning(paper, 4, tile=0, overlap=0) is None  # whole image: nothing to warn about
