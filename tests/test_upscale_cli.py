"""src/upscale.py end to end: mixed good/odd/corrupt inputs, per-file errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srgan import inference, models
from srgan.config import ROOT, GeneratorConfig, section

SCALE = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real generator (bicubic skip + custom layers) saved as .keras."""
    path = tmp_path_factory.mktemp("model") / "g.keras"
    models.build_generator(section(GeneratorConfig, blocks=1, filters=4), SCALE).save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Write the test images; returns stem -> (width, height)."""
    sub = folder / "sub"
    sub.mkdir(parents=True)
    Image.fromarray(_rgb(10, 12)).save(folder / "good.png")
    rgba = np.dstack([_rgb(9, 7, 1), np.linspace(0, 255, 63).reshape(9, 7).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    deep = (np.arange(8 * 11, dtype=np.uint16).reshape(8, 11) * 700).astype(np.uint16)
    Image.fromarray(deep).save(sub / "deep16.png")  # mode I;16 -> 16-bit grey PNG
    Image.fromarray(_rgb(13, 6, 2)[..., 0], "L").save(folder / "gray.jpg", quality=90)
    good = (folder / "good.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    with Image.open(sub / "deep16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    return {"good": (12, 10), "alpha": (7, 9), "deep16": (11, 8), "gray": (6, 13)}


def test_cli_subprocess(tmp_path: Path, model_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    sizes = _inputs(src)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/upscale.py"), "--model", str(model_path), "--out", str(out),
         "--tile", "8", "--overlap", "12", str(src)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    for stem, (w, h) in sizes.items():
        with Image.open(out / f"{stem}_x{SCALE}.png") as im:
            assert im.size == (w * SCALE, h * SCALE) and im.mode == "RGB"
    # exactly the outputs: nothing for notes.txt / corrupt.png, no temp-file leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_x{SCALE}.png" for s in sizes)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.png" in errors[0] and "truncated" in errors[0], proc.stderr
    assert errors[0].count("corrupt.png") == 1  # path not repeated by the loader's own message
    assert f"upscaled x{SCALE}: 4 written, 1 failed" in proc.stdout


def test_cli_in_process_exit_codes(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture) -> None:
    import upscale  # src/ is on the test path

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(6, 5)).save(src / "a.png")
    out = src / "sr"  # output folder inside the input folder
    assert upscale.main(["--model", str(model_path), "--out", str(out), "--tile", "0", str(src)]) == 0
    # a re-run must not pick up its own outputs from src/sr
    assert upscale.main(["--model", str(model_path), "--out", str(out), str(src)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png"]
    capsys.readouterr()

    Image.fromarray(_rgb(6, 5, 1)).save(src / "a.jpg")  # same stem -> same output name
    rc = upscale.main(["--model", str(model_path), "--out", str(out), str(src / "a.png"), str(src / "a.jpg"),
                       str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "already used by" in err and "missing.png: no such file or folder" in err

    rc = upscale.main(["--model", str(tmp_path / "nope.keras"), "--out", str(out), str(src)])
    assert rc == 1 and "cannot load generator" in capsys.readouterr().err


def test_upscale_files_matches_upscale(tmp_path: Path, model_path: Path) -> None:
    from srgan import images

    model = models.load_generator(model_path)
    lr = _rgb(11, 14, 5)
    images.save_png(tmp_path / "x.png", lr)
    (res,) = inference.upscale_files(model, [tmp_path / "x.png"], tmp_path / "o", tile=8, overlap=12)
    assert res.ok and res.out == tmp_path / "o" / "x_x4.png"
    expected = inference.upscale(model, lr, SCALE, tile=8, overlap=12)
    np.testing.assert_array_equal(images.load_rgb(res.out), expected)


def test_self_ensemble_flag_writes_the_ensemble(tmp_path: Path) -> None:
    import upscale  # src/ is on the test path

    from srgan import images

    g = models.build_generator(section(GeneratorConfig, blocks=1, filters=4), SCALE)
    last = g.get_layer("output_conv")  # zero-initialised = plain bicubic, which flips would not change
    rng = np.random.default_rng(1)
    last.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in last.get_weights()])
    g.save(tmp_path / "g.keras")
    lr = _rgb(9, 7, 3)
    images.save_png(tmp_path / "x.png", lr)
    assert upscale.main(["--model", str(tmp_path / "g.keras"), "--out", str(tmp_path / "o"), "--tile", "0",
                         "--self-ensemble", str(tmp_path / "x.png")]) == 0
    model = models.load_generator(tmp_path / "g.keras")
    written = images.load_rgb(tmp_path / "o" / "x_x4.png")
    np.testing.assert_array_equal(written, inference.upscale(model, lr, SCALE, tile=0, self_ensemble=True))
    assert not np.array_equal(written, inference.upscale(model, lr, SCALE, tile=0))
