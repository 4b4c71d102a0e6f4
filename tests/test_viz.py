"""srgan.viz: panel layouts and the zoomed-detail choice."""

import numpy as np

from srgan import viz


def test_image_grid_layout():
    lr = np.zeros((4, 5, 3), np.uint8)
    hr = np.full((16, 20, 3), 7, np.uint8)
    grid = viz.image_grid(lr, hr, hr, hr)
    assert grid.shape == (16, 4 * 20 + 3 * viz.SEPARATOR_PX, 3)
    assert (grid[:, :20] == 0).all() and (grid[:, 20:24] == 255).all() and (grid[:, -20:] == 7).all()


def test_detail_box_finds_the_textured_region():
    img = np.full((64, 80, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    img[30:46, 50:66] = rng.integers(0, 255, (16, 16, 3))
    r, c = viz.detail_box(img, 16)
    assert abs(r - 30) <= 1 and abs(c - 50) <= 1


def test_comparison_panels_frame_the_detail_on_hr_and_enlarge_it():
    rng = np.random.default_rng(1)
    hr = np.full((32, 40, 3), 100, np.uint8)
    hr[8:16, 20:28] = rng.integers(0, 255, (8, 8, 3))
    lr = hr[::4, ::4]
    out = viz.comparison_panels(lr, [hr, hr], hr, zoom=8)
    width = 4 * 40 + 3 * viz.SEPARATOR_PX
    assert out.shape[1] == width and out.shape[0] == 32 + viz.BAND_PX + 8 * (40 // 8)
    x0 = 3 * (40 + viz.SEPARATOR_PX)  # the HR panel: red frame around the detail
    r, c = viz.detail_box(hr, 8)
    assert tuple(out[r, x0 + c]) == viz.BOX_COLOR
    zoomed = out[32 + viz.BAND_PX:, :40]  # the nearest-LR panel's detail, enlarged 5x
    assert zoomed.shape[0] == 40


def test_upscale_nearest_repeats_pixels():
    lr = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    up = viz.upscale_nearest(lr, 3)
    assert up.shape == (6, 6, 3) and (up[:3, :3] == lr[0, 0]).all() and (up[3:, 3:] == lr[1, 1]).all()
