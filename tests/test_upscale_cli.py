"""src/upscale.py end to end: mixed good/odd/corrupt inputs, per-file errors, exit codes, the checks
made before any work (GitHub issue 17 item 7), Ctrl-C, and MLflow URIs as --model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srgan import batch_upscale, inference, models
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
    subdirs = {"deep16": "sub/"}  # a file in a sub-folder keeps it under --out
    env = _quiet_by_default_env()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/upscale.py"), "--model", str(model_path), "--out", str(out),
         "--tile", "8", "--overlap", "12", str(src)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    names = {stem: f"{subdirs.get(stem, '')}{stem}_x{SCALE}.png" for stem in sizes}
    for stem, (w, h) in sizes.items():
        with Image.open(out / names[stem]) as im:
            assert im.size == (w * SCALE, h * SCALE) and im.mode == "RGB"
    # exactly the outputs: nothing for notes.txt / corrupt.png, no temp-file leftovers
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(names.values())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.png" in errors[0] and "truncated" in errors[0], proc.stderr
    assert errors[0].count("corrupt.png") == 1  # path not repeated by the loader's own message
    assert f"upscaled x{SCALE}: 4 written, 1 failed" in proc.stdout
    # its own lines only: none of TensorFlow's start-up notices (SRGAN_VERBOSE=1 shows them, below)
    assert TF_NOTICE.search(proc.stderr) is None and "oneDNN custom operations" not in proc.stderr, proc.stderr


def test_cli_in_process_exit_codes(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture) -> None:
    import upscale  # src/ is on the test path

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(6, 5)).save(src / "a.png")
    out = src / "sr"  # output folder inside the input folder
    assert upscale.main(["--model", str(model_path), "--out", str(out), "--tile", "0", str(src)]) == 0
    # a re-run must not pick up its own outputs from src/sr (and may replace them only when asked)
    assert upscale.main(["--model", str(model_path), "--out", str(out), "--overwrite", str(src)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png"]
    capsys.readouterr()

    Image.fromarray(_rgb(6, 5, 1)).save(src / "a.jpg")  # same stem -> same output name
    rc = upscale.main(["--model", str(model_path), "--out", str(out), str(src / "a.png"), str(src / "a.jpg"),
                       str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "is also the output of" in err and "missing.png: no such file or folder" in err

    rc = upscale.main(["--model", str(tmp_path / "nope.keras"), "--out", str(out), str(src)])
    assert rc == 1 and "cannot load generator" in capsys.readouterr().err


def test_upscale_files_matches_upscale(tmp_path: Path, model_path: Path) -> None:
    from srgan import images

    model = models.load_generator(model_path)
    lr = _rgb(11, 14, 5)
    images.save_png(tmp_path / "x.png", lr)
    (res,) = batch_upscale.upscale_files(model, [tmp_path / "x.png"], tmp_path / "o", tile=8, overlap=12)
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


# -- GitHub issue 17 item 7: checks before any work, no silent overwrite, Ctrl-C ---------------------

def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_same_name_in_two_folders_is_refused_not_overwritten(tmp_path: Path, model_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import upscale

    first, second, out = tmp_path / "in1", tmp_path / "in2", tmp_path / "out"
    for folder, seed in ((first, 1), (second, 2)):
        (folder / "2020").mkdir(parents=True)
        Image.fromarray(_rgb(6, 5, seed)).save(folder / "a.png")
        Image.fromarray(_rgb(6, 5, seed + 10)).save(folder / "2020" / "b.png")
    (first / "2021").mkdir()
    Image.fromarray(_rgb(6, 5, 3)).save(first / "2021" / "b.png")  # same name, other sub-folder: kept apart
    assert upscale.main(["--model", str(model_path), "--out", str(out), str(first), str(second)]) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 2 and all("is also the output of" in e and str(first) in e for e in errors)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == \
        ["2020/b_x4.png", "2021/b_x4.png", "a_x4.png"]
    model = models.load_generator(model_path)
    from srgan import images

    np.testing.assert_array_equal(images.load_rgb(out / "a_x4.png"),  # the first folder's, not the second's
                                  inference.upscale(model, images.load_rgb(first / "a.png"), SCALE, tile=128,
                                                    overlap=24))


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, model_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    import upscale

    Image.fromarray(_rgb(6, 5)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x4.png").write_bytes(b"an earlier result")
    assert upscale.main(["--model", str(model_path), "--out", str(out), str(tmp_path / "a.png")]) == 1
    assert "already exists (--overwrite replaces it)" in capsys.readouterr().err
    assert (out / "a_x4.png").read_bytes() == b"an earlier result"
    assert upscale.main(["--model", str(model_path), "--out", str(out), "--overwrite", str(tmp_path / "a.png")]) == 0
    with Image.open(out / "a_x4.png") as im:
        assert im.size == (5 * SCALE, 6 * SCALE)


def test_out_equal_to_input_folder_says_what_is_wrong(tmp_path: Path, model_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import upscale

    Image.fromarray(_rgb(6, 5)).save(tmp_path / "a.png")
    assert upscale.main(["--model", str(model_path), "--out", str(tmp_path), str(tmp_path)]) == 1
    (error,) = _errors(capsys.readouterr().err)
    assert "is the output folder" in error and "choose another --out" in error and "no image" not in error


def test_out_that_is_a_file_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import upscale

    Image.fromarray(_rgb(6, 5)).save(tmp_path / "a.png")
    (tmp_path / "out").write_text("a file")
    # the model does not even exist: the --out check comes first (before TensorFlow and the model)
    rc = upscale.main(["--model", str(tmp_path / "nope.keras"), "--out", str(tmp_path / "out"), str(tmp_path / "a.png")])
    assert rc == 1 and _errors(capsys.readouterr().err) == [f"error: --out {tmp_path / 'out'} exists and is not a folder"]
    assert (tmp_path / "out").read_text() == "a file"


def test_huge_input_is_refused_from_its_header(tmp_path: Path, model_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The issue's case: a small PNG of 12000 x 12000 px (here bilevel: ~20 KB on disk)."""
    import time
    import warnings

    import upscale

    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")
    Image.fromarray(_rgb(10, 12)).save(tmp_path / "small.png")
    assert (tmp_path / "huge.png").stat().st_size < 500_000
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no PIL warning either
        rc = upscale.main(["--model", str(model_path), "--out", str(out), str(tmp_path / "huge.png"),
                           str(tmp_path / "small.png")])
    assert time.perf_counter() - t0 < 60  # seconds, not hours (most of it is loading TensorFlow)
    (error,) = _errors(capsys.readouterr().err)
    assert rc == 1 and "huge.png: 12000x12000 is 144.0 MP, over the limit of 50 MP" in error
    assert "raise --max-pixels" in error
    assert sorted(p.name for p in out.iterdir()) == ["small_x4.png"]

    # the limit is the flag's: 120 LR px refused at 100, accepted at 120
    rc = upscale.main(["--model", str(model_path), "--out", str(tmp_path / "o2"), "--max-pixels", "100",
                       str(tmp_path / "small.png")])
    assert rc == 1 and "over the limit" in capsys.readouterr().err
    assert upscale.main(["--model", str(model_path), "--out", str(tmp_path / "o2"), "--max-pixels", "120",
                         str(tmp_path / "small.png")]) == 0


def test_ctrl_c_in_process_one_line_no_partial_output(tmp_path: Path, model_path: Path, monkeypatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C while the second output is being written: exit 130, one line, only whole files."""
    import upscale

    for i in range(3):
        Image.fromarray(_rgb(6, 5, i)).save(tmp_path / f"a{i}.png")
    saves = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            fp.write(b"\x89PNG half")  # half an image, then the interrupt
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    assert upscale.main(["--model", str(model_path), "--out", str(out), str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"interrupted: 1 image(s) written to {out}; the one in progress was not"]
    assert [p.name for p in out.iterdir()] == ["a0_x4.png"]  # no temp file, no half a1


@pytest.mark.slow
def test_ctrl_c_subprocess_exit_130_without_traceback(tmp_path: Path, model_path: Path) -> None:
    """A real SIGINT once the first output is written."""
    import signal

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    side = 96  # 144 tiles of 8 px each: far more work than the time the signal takes to arrive
    for i in range(40):
        Image.fromarray(_rgb(side, side, i)).save(src / f"im{i:02d}.png")
    # unbuffered: the first line must reach us when it is printed, not when the pipe's buffer fills
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "src/upscale.py"), "--model", str(model_path), "--out", str(out),
         "--tile", "8", "--overlap", "12", str(src)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a background job (`make test &`) inherits SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        assert " -> " in first, first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted: "), stderr
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 40 and all(p.name.endswith("_x4.png") for p in written)  # no temp files
    for p in written:
        with Image.open(p) as im:
            im.load()
            assert im.size == (side * SCALE, side * SCALE)


# -- --model as an MLflow URI -----------------------------------------------------------------------

def test_model_uris(tmp_path: Path, model_path: Path, mlflow_uri: str, monkeypatch) -> None:
    import mlflow

    import upscale
    from srgan import images, tracking

    before = mlflow.get_tracking_uri()
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        run = tracking.start_run("uris")
        run.log_artifact(model_path, "model")
        tracking.log_generator_model(run.run_id, model_path, 16, 12, SCALE)
        run.end()
        version = tracking.register_model(run.run_id, "upscaler")
        tracking.set_champion("upscaler", version)
        Image.fromarray(_rgb(9, 7, 4)).save(tmp_path / "x.png")
        outputs = []
        for i, spec in enumerate([str(model_path), f"runs:/{run.run_id}", f"runs:/{run.run_id}/model",
                                  "models:/upscaler@champion", f"models:/upscaler/{version}"]):
            out = tmp_path / f"o{i}"
            assert upscale.main(["--model", spec, "--out", str(out), str(tmp_path / "x.png")]) == 0, spec
            outputs.append(images.load_rgb(out / "x_x4.png"))
        assert all(np.array_equal(o, outputs[0]) for o in outputs)
        assert upscale.main(["--model", "models:/upscaler@nope", "--out", str(tmp_path / "o9"),
                             str(tmp_path / "x.png")]) == 1
    finally:
        mlflow.set_tracking_uri(before)


# -- the faults of GitHub issue 28 item 8 -----------------------------------------------------------

def _upscale_cmd(model_path: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "src/upscale.py"), "--model", str(model_path), "--out", str(out), *args]


@pytest.mark.slow
def test_two_upscales_into_one_out_never_replace_each_others_file(tmp_path: Path, model_path: Path) -> None:
    """Both plan (no output yet), both compute, both write: the check-then-rename race replaced the
    first's file and both said "1 written". The output is now created without replacing anything."""
    src = tmp_path / "big.png"
    Image.fromarray(_rgb(384, 384, 7)).save(src)
    out = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # the self-ensemble makes the work (~10 s) much longer than the gap between the two start-ups
    cmd = _upscale_cmd(model_path, out, "--tile", "32", "--overlap", "8", "--self-ensemble", str(src))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], results
    loser = results[[p.returncode for p in procs].index(1)]
    (error,) = [ln for ln in loser[1].splitlines() if ln.startswith("error:")]
    assert str(out / "big_x4.png") in error and ("already exists" in error or "appeared" in error), error
    assert "0 written, 1 failed" in loser[0]
    assert [p.name for p in out.iterdir()] == ["big_x4.png"]  # and no temp files left behind
    with Image.open(out / "big_x4.png") as im:
        im.load()
        assert im.size == (384 * SCALE, 384 * SCALE)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real file system that fills up: a 1 MB tmpfs (root only; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs for a real full disk: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_stops_the_batch(tmp_path: Path, model_path: Path, small_disk: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """Noise does not compress: each 128 x 128 input makes a ~0.8 MB PNG, so the 1 MB disk takes one."""
    import time

    import upscale

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(_rgb(128, 128, i)).save(src / f"n{i}.png")
    t0 = time.perf_counter()
    rc = upscale.main(["--model", str(model_path), "--out", str(small_disk), str(src)])
    took = time.perf_counter() - t0
    captured = capsys.readouterr()
    errors = _errors(captured.err)
    assert rc == 1 and "1 written, 5 failed" in captured.out, captured
    assert "No space left on device" in errors[0] and "n1.png" in errors[0], errors
    assert all("not upscaled" in e and "out of space" in e for e in errors[1:]) and len(errors) == 5, errors
    assert [p.name for p in small_disk.iterdir()] == ["n0_x4.png"]  # no temp file eats the space
    assert took < 60, took


def test_odd_entries_in_an_input_folder_are_reported(tmp_path: Path, model_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import upscale

    src = tmp_path / "in"
    (src / "dir.png").mkdir(parents=True)  # a folder named like an image (its images still count)
    Image.fromarray(_rgb(6, 5)).save(src / "dir.png" / "inner.png")
    Image.fromarray(_rgb(6, 5, 1)).save(src / "good.png")
    (src / "loop.png").symlink_to("loop.png")
    (src / "broken.png").symlink_to("missing.png")
    os.mkfifo(src / "pipe.png")  # reading it would wait for a writer forever
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(_rgb(6, 5, 2)).save(elsewhere / "far.png")
    (src / "linked").symlink_to(elsewhere)  # a symlink to a folder is not followed: say so
    out = tmp_path / "out"
    rc = upscale.main(["--model", str(model_path), "--out", str(out), str(src), str(src / "pipe.png")])
    captured = capsys.readouterr()
    errors = _errors(captured.err)
    assert rc == 1, captured

    def about(name: str) -> str:
        (line,) = [e for e in errors if f"{src / name}:" in e]
        return line

    assert "folder" in about("dir.png")
    assert "symlink loop" in about("loop.png")
    assert "broken symlink" in about("broken.png") and "missing.png" in about("broken.png")
    assert all("FIFO" in e for e in errors if f"{src / 'pipe.png'}:" in e)
    assert len([e for e in errors if f"{src / 'pipe.png'}:" in e]) == 2  # in the folder, and named
    assert "not followed" in about("linked")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["dir.png/inner_x4.png", "good_x4.png"]
    assert "2 written, 6 failed" in captured.out, captured.out


# TensorFlow's start-up notices: absl's warning, then glog-style lines ("I0000 00:00:... port.cc:153] ...")
TF_NOTICE = re.compile(r"absl::InitializeLog|^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]", re.MULTILINE)


def _quiet_by_default_env() -> dict[str, str]:
    """The environment of a user who set nothing: no TF_CPP_MIN_LOG_LEVEL, not verbose, oneDNN on
    (whose notice TF_CPP_MIN_LOG_LEVEL does not silence)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "SRGAN_VERBOSE")}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def test_tensorflow_start_up_notices_when_verbose(tmp_path: Path, model_path: Path) -> None:
    """`srgan upscale` with SRGAN_VERBOSE=1 shows TensorFlow's notices, even the oneDNN one (without
    it, its own lines only: test_cli_subprocess)."""
    Image.fromarray(_rgb(6, 5)).save(tmp_path / "a.png")
    env = {**_quiet_by_default_env(), "SRGAN_VERBOSE": "1"}
    srgan = [sys.executable, "-c", "from srgan.cli import main; main()"]  # the `srgan` command
    proc = subprocess.run([*srgan, "upscale", "--model", str(model_path), "--out", str(tmp_path / "out"),
                           str(tmp_path / "a.png")], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert proc.returncode == 0 and "1 written" in proc.stdout, proc.stderr
    assert TF_NOTICE.search(proc.stderr) is not None, proc.stderr
    assert "oneDNN custom operations are on" in proc.stderr, proc.stderr
