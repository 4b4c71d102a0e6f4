"""Tiled inference equals whole-image inference for a model whose receptive field fits the overlap."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from srgan import inference
from srgan.config import GeneratorConfig, RrdbConfig, section
from srgan.models import build_generator, receptive_radius

# LR receptive-field radius of _tiny_model: two 3x3 LR convs (1 + 1), a 3x3 HR conv after
# upsampling (ceil(1/scale) = 1) -> 3 px; the bilinear skip needs 1 px. Any overlap >= 3 works.
RF_RADIUS = 3
FLOAT_TOL = 1e-5  # tiled vs whole float32 output (see _assert_same)
SEAM_MIN = 10 * FLOAT_TOL  # a real seam: well above that noise


def _tiny_model(scale: int, seed: int = 0) -> keras.Model:
    """Zero-'same'-padded convs + upsampling + a bilinear skip: border behaviour like a real generator."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D(scale)(x)
    small = keras.initializers.RandomNormal(0, 0.1)
    x = keras.layers.Conv2D(3, 3, padding="same", kernel_initializer=small)(x)
    skip = keras.layers.UpSampling2D(scale, interpolation="bilinear")(inp)
    return keras.Model(inp, keras.layers.Add()([skip, x]))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models() -> dict[int, keras.Model]:
    return {s: _tiny_model(s, seed=s) for s in (2, 3, 4)}


def _assert_same(whole_f: np.ndarray, tiled_f: np.ndarray, whole: np.ndarray, tiled: np.ndarray) -> None:
    # Float: the same arithmetic on differently shaped inputs, but not bit-identical: oneDNN
    # may order sums differently per shape (~1e-7 measured at x2/x4), and TF's bilinear resize
    # computes its in/out scale in float32, so at x3 (1/3 inexact, size-dependent) the skip path
    # differs by ~2e-6 at 37x53 (~1e-5 at 200x150). Hence 1e-5, and a rare 1-level uint8 flip.
    np.testing.assert_allclose(tiled_f, whole_f, rtol=0, atol=FLOAT_TOL)
    # uint8: a pixel can only flip when its value*255 sits within that noise of a .5 boundary.
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.999


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiled_equals_whole_odd_size(models: dict[int, keras.Model], scale: int) -> None:
    model, lr = models[scale], _image(37, 53, seed=scale)
    whole_f = inference.upscale_float(model, lr, scale)
    tiled_f = inference.upscale_float(model, lr, scale, tile=16, overlap=6)
    whole = inference.upscale(model, lr, scale)
    tiled = inference.upscale(model, lr, scale, tile=16, overlap=6)
    assert whole.shape == tiled.shape == (37 * scale, 53 * scale, 3) and tiled.dtype == np.uint8
    _assert_same(whole_f, tiled_f, whole, tiled)
    np.testing.assert_array_equal(whole, inference.to_uint8(whole_f))


@pytest.mark.parametrize(
    "h, w", [(1, 1), (1, 20), (17, 1), (33, 17), (16, 16), (2, 35)]
)  # 1-px images and 1-px last cores
def test_tiled_equals_whole_edge_sizes(models: dict[int, keras.Model], h: int, w: int) -> None:
    model, lr = models[2], _image(h, w, seed=h * 100 + w)
    whole_f = inference.upscale_float(model, lr, 2)
    tiled_f = inference.upscale_float(model, lr, 2, tile=16, overlap=RF_RADIUS)
    whole, tiled = inference.upscale(model, lr, 2), inference.upscale(model, lr, 2, 16, RF_RADIUS)
    _assert_same(whole_f, tiled_f, whole, tiled)


def test_tile_larger_than_image_is_whole_image(models: dict[int, keras.Model]) -> None:
    lr = _image(37, 53, seed=7)
    # a single window covering the image: the very same computation, bit-identical
    np.testing.assert_array_equal(
        inference.upscale_float(models[3], lr, 3, tile=64, overlap=16),
        inference.upscale_float(models[3], lr, 3),
    )


def test_batched_tiles_equal_single(models: dict[int, keras.Model]) -> None:
    lr = _image(37, 53, seed=9)  # 12 tiles: batch 5 leaves a padded last batch
    one = inference.upscale_float(models[4], lr, 4, tile=16, overlap=6)
    five = inference.upscale_float(models[4], lr, 4, tile=16, overlap=6, batch=5)
    np.testing.assert_allclose(five, one, rtol=0, atol=1e-5)


def test_overlap_too_small_shows_seams(models: dict[int, keras.Model]) -> None:
    """Sanity check of the test itself: without enough context the seams do differ."""
    lr = _image(37, 53, seed=11)
    whole = inference.upscale_float(models[2], lr, 2)
    tiled = inference.upscale_float(models[2], lr, 2, tile=16, overlap=0)
    assert np.abs(whole - tiled).max() > 1e-3


@pytest.mark.parametrize(
    "h, w, tile, overlap", [(37, 53, 16, 6), (5, 200, 7, 3), (64, 64, 16, 16), (9, 9, 1, 2)]
)
def test_plan_windows(h: int, w: int, tile: int, overlap: int) -> None:
    wins = inference.plan_windows(h, w, tile, overlap)
    cover = np.zeros((h, w), int)
    assert len({(t.h, t.w) for t in wins}) == 1  # one window shape -> one traced graph
    for t in wins:
        # memory bound: never more than (tile + 2*overlap)^2 pixels per window, and inside the image
        assert t.h <= tile + 2 * overlap and t.w <= tile + 2 * overlap
        assert 0 <= t.wy and t.wy + t.h <= h and 0 <= t.wx and t.wx + t.w <= w
        # each core has >= overlap px of context on every side, or touches the image border there
        assert t.wy == 0 or t.y0 - t.wy >= overlap
        assert t.wx == 0 or t.x0 - t.wx >= overlap
        assert t.wy + t.h == h or t.wy + t.h - t.y1 >= overlap
        assert t.wx + t.w == w or t.wx + t.w - t.x1 >= overlap
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert (cover == 1).all()  # cores tile the image exactly once


def test_one_trace_for_all_tiles_and_sizes() -> None:
    model = _tiny_model(2)
    for h, w in [(40, 45), (61, 33), (30, 90)]:  # all >= the 28 px window
        inference.upscale(model, _image(h, w), 2, tile=16, overlap=6)
    assert inference._predict_fn(model).experimental_get_tracing_count() == 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_infer_scale(models: dict[int, keras.Model], scale: int) -> None:
    assert inference.infer_scale(models[scale]) == scale


def test_validation(models: dict[int, keras.Model]) -> None:
    lr = _image(8, 8)
    with pytest.raises(ValueError, match="not a x3"):
        inference.upscale(models[2], lr, 3)
    with pytest.raises(ValueError, match="uint8"):
        inference.upscale(models[2], lr.astype(np.float32), 2)
    with pytest.raises(ValueError, match="uint8"):
        inference.upscale(models[2], lr[..., 0], 2)
    with pytest.raises(ValueError, match="tile"):
        inference.plan_windows(8, 8, 4, -1)


def test_to_uint8_clips_and_rounds() -> None:
    x = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 254.4 / 255, 1.0, 7.0])
    assert inference.to_uint8(x).tolist() == [0, 0, 0, 2, 254, 255, 255]


def test_whole_image_for_all_scales_is_clipped(models: dict[int, keras.Model]) -> None:
    for scale, (h, w) in itertools.product((2, 3), [(3, 5)]):
        sr = inference.upscale(models[scale], _image(h, w), scale)
        assert sr.shape == (h * scale, w * scale, 3) and sr.dtype == np.uint8


def test_dihedral_views_write_back_to_the_original_frame() -> None:
    img = _image(5, 7)
    seen = set()
    for k, flip in inference.DIHEDRAL:
        t = inference._forward(img, k, flip)
        assert t.shape == ((7, 5, 3) if k % 2 else (5, 7, 3))
        back = np.zeros_like(img)
        inference._view(back, k, flip)[...] = t  # what the ensemble does with each output
        np.testing.assert_array_equal(back, img)
        seen.add(t.tobytes())
    assert len(seen) == 8  # eight distinct symmetries, not one counted twice


@pytest.mark.parametrize("scale", [2, 3])
def test_self_ensemble_is_equivariant_and_not_a_single_pass(
    models: dict[int, keras.Model], scale: int
) -> None:
    """E(T x) = T E(x) for every flip/rotation T, although the model itself is not equivariant."""
    model, lr = models[scale], _image(9, 13, seed=5)
    ens = inference.upscale(model, lr, scale, self_ensemble=True)
    single = inference.upscale(model, lr, scale)
    assert ens.shape == single.shape == (9 * scale, 13 * scale, 3)
    assert np.abs(ens.astype(int) - single.astype(int)).max() > 1  # averaging changed the output
    for k, flip in inference.DIHEDRAL:
        moved = inference.upscale(model, inference._forward(lr, k, flip), scale, self_ensemble=True)
        # the same 8 outputs summed in another order: equal up to float rounding (rare 1-level flips)
        diff = np.abs(moved.astype(int) - inference._forward(ens, k, flip).astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (k, flip)
    # the ensemble composes with tiling: tiled windows (rotated shapes too) give the same image
    tiled = inference.upscale(model, lr, scale, tile=4, overlap=RF_RADIUS, self_ensemble=True)
    diff = np.abs(tiled.astype(int) - ens.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


# --------------------------------------------------------------------------- the real generators
# (arch, upsampler, scale): every arch, both heads, every scale at least once
GENERATOR_CASES = [
    ("srresnet", "light", 4), ("srresnet", "paper", 3),
    ("edsr", "light", 3), ("edsr", "paper", 4),
    ("rrdb", "light", 2), ("rrdb", "paper", 4),
]


def _generator(arch: str, upsampler: str, scale: int) -> tuple[keras.Model, int]:
    """A tiny generator with random weights everywhere (incl. the zero-initialised head), and
    its receptive-field radius."""
    cfg = section(GeneratorConfig, arch=arch, upsampler=upsampler, blocks=1, filters=4, bicubic_skip=True,
                  rrdb=section(RrdbConfig, growth=2, dense_layers=2))
    keras.utils.set_random_seed(scale)
    g = build_generator(cfg, scale)
    rng = np.random.default_rng(scale)
    g.set_weights([w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype) for w in g.get_weights()])
    return g, receptive_radius(cfg, scale)


@pytest.mark.parametrize("arch, upsampler, scale", GENERATOR_CASES)
def test_generator_tiled_equals_whole_at_its_radius(arch: str, upsampler: str, scale: int) -> None:
    model, radius = _generator(arch, upsampler, scale)
    lr = _image(29, 37, seed=scale)
    tile = 8  # windows of 8 + 2 * radius px: several per axis for every radius here (<= 10)
    n_windows = len(inference.plan_windows(*lr.shape[:2], tile, radius))
    assert n_windows > 4
    whole_f = inference.upscale_float(model, lr, scale)
    # all windows in one call (the batch is padded, so any batch gives the same tiles)
    tiled_f = inference.upscale_float(model, lr, scale, tile=tile, overlap=radius, batch=n_windows)
    whole, tiled = inference.to_uint8(whole_f), inference.to_uint8(tiled_f)
    _assert_same(whole_f, tiled_f, whole, tiled)
    # Sanity check of the test: too little context shows the seams. (That the radius is exact,
    # not just enough, test_models measures; the last px's influence through a deep conv chain
    # can be float-noise small, so it is not checked here.)
    short_f = inference.upscale_float(model, lr, scale, tile=tile, overlap=radius // 2, batch=n_windows)
    assert np.abs(short_f - whole_f).max() > SEAM_MIN
