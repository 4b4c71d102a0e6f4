"""Building a rating study: opaque names, one crop box per image, calibration methods, safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mos as mos_cli
from srgan.mos import study as S


def make_valid(root: Path, n: int = 3, lr_hw: tuple[int, int] = (12, 16), scale: int = 4) -> Path:
    """n random HR/LR pairs in root/hr, root/lr (LR = HR subsampled: only shapes matter here)."""
    rng = np.random.default_rng(0)
    for d in ("hr", "lr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hr = rng.integers(0, 256, (lr_hw[0] * scale, lr_hw[1] * scale, 3), dtype=np.uint8)
        Image.fromarray(hr).save(root / "hr" / f"img{i}.png")
        Image.fromarray(hr[::scale, ::scale]).save(root / "lr" / f"img{i}.png")
    return root


def fake_model(lr: np.ndarray, scale: int) -> np.ndarray:
    """A stand-in generator (no TensorFlow): bicubic, inverted, so its pixels are recognisable."""
    return 255 - S.upscale_bicubic(lr, scale)


def _read(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"))


def test_prepare_crop_study(tmp_path):
    valid = make_valid(tmp_path / "valid")
    st = S.prepare_study(valid, tmp_path / "study", [S.ModelMethod("gan", fake_model, "fake")],
                         crop=32, log=lambda s: None)
    assert len(st.stimuli) == 3 * 4
    assert st.scale == 4 and st.method_order() == ["nearest", "bicubic", "gan", "hr"]
    files = sorted(p.name for p in (tmp_path / "study" / "stimuli").iterdir())
    assert files == sorted(f"{sid}.png" for sid in st.stimuli)
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", f) for f in files)  # nothing but random hex
    meta = json.loads((tmp_path / "study" / "study.json").read_text())
    for img in st.images:
        hr, lr = _read(valid / "hr" / f"{img}.png"), _read(valid / "lr" / f"{img}.png")
        entries = {s["method"]: (sid, s) for sid, s in meta["stimuli"].items() if s["image"] == img}
        assert set(entries) == {"nearest", "bicubic", "gan", "hr"}
        boxes = {tuple(s["box"]) for _, s in entries.values()}
        assert len(boxes) == 1  # the same crop box for every method of an image
        x0, y0, x1, y1 = boxes.pop()
        assert (x1 - x0, y1 - y0) == (32, 32) and x0 % 4 == 0 and y0 % 4 == 0
        got = {m: _read(tmp_path / "study" / "stimuli" / f"{sid}.png") for m, (sid, _) in entries.items()}
        assert all(a.shape == (32, 32, 3) for a in got.values())
        np.testing.assert_array_equal(got["hr"], hr[y0:y1, x0:x1])
        # Cropping with context must equal upscaling the whole image and cropping afterwards.
        full_bic = S.upscale_bicubic(lr, 4)
        np.testing.assert_array_equal(got["bicubic"], full_bic[y0:y1, x0:x1])
        np.testing.assert_array_equal(got["gan"], 255 - full_bic[y0:y1, x0:x1])
        np.testing.assert_array_equal(got["nearest"], np.repeat(np.repeat(lr, 4, 0), 4, 1)[y0:y1, x0:x1])


def test_prepare_whole_images_and_sampling(tmp_path):
    valid = make_valid(tmp_path / "valid", n=5)
    st = S.prepare_study(valid, tmp_path / "study", crop=0, images=2, seed=7, log=lambda s: None)
    assert len(st.images) == 2 and len(st.stimuli) == 2 * 3
    assert all((s.width, s.height) == (64, 48) for s in st.stimuli.values())
    again = S.prepare_study(valid, tmp_path / "study2", images=2, seed=7, log=lambda s: None)
    assert again.images == st.images  # seeded sample
    assert again.study_id != st.study_id and not set(again.stimuli) & set(st.stimuli)


def test_prepare_refuses_overwrite_and_bad_models(tmp_path):
    valid = make_valid(tmp_path / "valid", n=1)
    out = tmp_path / "study"
    first = S.prepare_study(valid, out, log=lambda s: None)
    with pytest.raises(S.StudyError, match="already exists"):
        S.prepare_study(valid, out, log=lambda s: None)
    second = S.prepare_study(valid, out, force=True, log=lambda s: None)
    assert S.load_study(out).study_id == second.study_id != first.study_id
    assert len(list((out / "stimuli").iterdir())) == 3

    def wrong_shape(lr: np.ndarray, scale: int) -> np.ndarray:
        return lr
    with pytest.raises(S.StudyError, match="returned"):
        S.prepare_study(valid, tmp_path / "bad", [S.ModelMethod("m", wrong_shape)], log=lambda s: None)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # temp folder cleaned
    with pytest.raises(S.StudyError, match="reserved"):
        S.prepare_study(valid, tmp_path / "x", [S.ModelMethod("hr", fake_model)], log=lambda s: None)
    with pytest.raises(S.StudyError, match="no validation images"):
        S.prepare_study(tmp_path / "nothing", tmp_path / "y", log=lambda s: None)


def test_parse_model_spec():
    assert S.parse_model_spec("srgan=models/generator.keras") == ("srgan", "models/generator.keras", None)
    assert S.parse_model_spec("best=runs:/0123abcd") == ("best", None, "0123abcd")
    for bad in ("noequals", "=x.keras", "a b=x.keras", "bicubic=x.keras", "m="):
        with pytest.raises(S.StudyError):
            S.parse_model_spec(bad)


def test_load_study_rejects_bad_ids(tmp_path):
    valid = make_valid(tmp_path / "valid", n=1)
    S.prepare_study(valid, tmp_path / "s", log=lambda s: None)
    meta = json.loads((tmp_path / "s" / "study.json").read_text())
    meta["stimuli"]["../../etc"] = next(iter(meta["stimuli"].values()))
    (tmp_path / "s" / "study.json").write_text(json.dumps(meta))
    with pytest.raises(S.StudyError, match="bad stimulus"):
        S.load_study(tmp_path / "s")


def test_cli_prepare_and_results(tmp_path, capsys):
    valid = make_valid(tmp_path / "valid", n=2)
    study = tmp_path / "mos" / "study"
    mos_cli.main(["prepare", "--valid", str(valid), "--study", str(study), "--crop", "32"])
    with pytest.raises(S.StudyError, match="already exists"):  # cli.run_main prints it, exit 1
        mos_cli.main(["prepare", "--valid", str(valid), "--study", str(study)])
    out = tmp_path / "reports"
    mos_cli.main(["results", "--study", str(study), "--out", str(out), "--no-mlflow"])
    assert "no ratings yet" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"mos.json", "mos.md", "mos.png"}
