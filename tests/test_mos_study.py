"""Building a rating study: opaque names, one crop box per image, calibration methods, safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mos as mos_cli
from srgan.mos import study as S

ROOT = Path(__file__).resolve().parents[1]


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


def test_cli_mistakes_print_one_error_line(tmp_path):
    """Realistic mistakes end in one ``error: ...`` line and exit 1, never a traceback."""
    valid = make_valid(tmp_path / "valid", n=1)
    study = tmp_path / "study"
    S.prepare_study(valid, study, log=lambda s: None)
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("these are not ratings\n" * 100)
    (tmp_path / "fake.keras").write_bytes(b"not a zip archive")
    new_study = tmp_path / "new-study"
    prep = ["prepare", "--valid", str(valid), "--study", str(new_study)]
    res = ["results", "--study", str(study), "--out", str(tmp_path / "reports"), "--no-mlflow"]
    cases = [
        ([*prep, "--model", "b=params.yaml"], "params.yaml is not a Keras model file"),  # the reported one
        ([*prep, "--model", f"b={tmp_path / 'fake.keras'}"], "is not a Keras model file"),
        ([*prep, "--model", "b=no/such/model.keras"], "is not a file"),
        ([*res, "--db", str(not_sqlite)], "not a sqlite"),  # the reported one
        ([*res, "--db", str(tmp_path / "missing.sqlite")], "no ratings database"),
        (["serve", "--study", str(study), "--db", str(not_sqlite), "--port", "1"], "not a sqlite"),
    ]
    for args, message in cases:
        # cwd = the repository: "b=params.yaml" is the project's real params file, as typed there.
        p = subprocess.run([sys.executable, str(ROOT / "src" / "mos.py"), *args], cwd=ROOT, check=False,
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 1, (args, p.stderr)
        assert "Traceback" not in p.stderr, (args, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, p.stderr)
        assert message in lines[0], (args, lines[0])
    assert not new_study.exists() and not (tmp_path / "reports").exists()
    assert not_sqlite.read_text() == "these are not ratings\n" * 100  # refused, not converted


def test_prepare_writes_equal_size_stimuli(tmp_path):
    valid = make_valid(tmp_path / "valid", n=2)
    st = S.prepare_study(valid, tmp_path / "study", [S.ModelMethod("gan", fake_model, "fake")],
                         log=lambda s: None)
    for img in st.images:
        files = [st.stimuli_dir / s.file for s in st.stimuli.values() if s.image == img]
        assert len({f.stat().st_size for f in files}) == 1
        w, h = 64, 48
        assert files[0].stat().st_size == len(S.blind_png(np.zeros((h, w, 3), np.uint8)))
    assert S.blinding_problems(st) == []
    with pytest.raises(S.StudyError, match="uint8 HxWx3"):
        S.blind_png(np.zeros((4, 4), np.uint8))


def test_prepare_write_order_does_not_follow_the_method(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    for i in range(8):
        (probe / f"{i}").write_bytes(b"x")
    inodes = [(probe / f"{i}").stat().st_ino for i in range(8)]
    if inodes != sorted(inodes):
        pytest.skip("inode numbers on this file system do not follow creation order")
    # Inode order is write order here, as `ls -i` or a directory listing would show it.
    valid = make_valid(tmp_path / "valid", n=6)
    st = S.prepare_study(valid, tmp_path / "study", [S.ModelMethod("gan", fake_model, "fake")],
                         log=lambda s: None)
    orders = set()
    for img in st.images:
        stims = [s for s in st.stimuli.values() if s.image == img]
        stims.sort(key=lambda s: (st.stimuli_dir / s.file).stat().st_ino)
        orders.add(tuple(s.method for s in stims))
    assert len(orders) > 1  # a fixed order would repeat on all 6 images (chance: 24^-5)


def test_model_method_loads_a_real_generator_and_refuses_other_archives(tmp_path, tiny_cfg):
    pytest.importorskip("tensorflow")
    import zipfile

    from srgan.models import build_generator, save_generator

    path = save_generator(build_generator(tiny_cfg.model.generator, 4), tmp_path / "g.keras")
    m = S.model_method(f"g={path}", tile=0)
    sr = m.upscale(np.zeros((6, 5, 3), np.uint8), 4)
    assert (m.name, m.source, sr.shape, sr.dtype) == ("g", str(path), (24, 20, 3), np.uint8)
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:  # a zip, but no Keras model inside
        z.writestr("readme.txt", "hello")
    with pytest.raises(S.StudyError, match="not a loadable generator"):
        S.model_method(f"g={tmp_path / 'other.keras'}")


def test_model_method_accepts_mlflow_uris(tmp_path, mlflow_uri, monkeypatch):
    """NAME=runs:/ID[/model] and NAME=models:/MODEL@ALIAS|/VERSION: the generator and its run (for the MOS)."""
    pytest.importorskip("tensorflow")
    import mlflow
    from test_tracking import log_tiny_generator

    from srgan import tracking

    before = mlflow.get_tracking_uri()
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        run_id, _ = log_tiny_generator(tmp_path, "mos", 30.0)
        version = tracking.register_model(run_id, "rated")
        tracking.set_champion("rated", version)
        assert S.parse_model_spec("g=models:/rated@champion") == ("g", "models:/rated@champion", None)
        assert S.parse_model_spec(f"g=runs:/{run_id}/model") == ("g", None, run_id)
        for uri in (f"runs:/{run_id}", f"runs:/{run_id}/model", "models:/rated@champion", f"models:/rated/{version}"):
            m = S.model_method(f"g={uri}", tile=0)
            source = f"runs:/{run_id}" if uri.startswith("runs:/") else uri  # the run's spelling, normalised
            assert (m.name, m.source, m.run_id) == ("g", source, run_id), uri
            assert m.upscale(np.zeros((6, 5, 3), np.uint8), 4).shape == (24, 20, 3)
        with pytest.raises(S.StudyError, match="models:/rated@nope"):
            S.model_method("g=models:/rated@nope")
        with pytest.raises(S.StudyError, match="runs:/RUN_ID/model"):
            S.parse_model_spec("g=runs:/abc/other")
    finally:
        mlflow.set_tracking_uri(before)
