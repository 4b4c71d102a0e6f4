"""Shared fixtures: a tiny config, a tiny preprocessed dataset, a private MLflow store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from srgan import config  # noqa: E402

SKIMAGE_PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]

# A model and data small enough for a 2-core CPU: one block, a few filters, 16-px HR patches.
TINY = {
    "preprocess": {"scale": 4, "hr_crop": 32, "crops_per_image": 4, "shard_size": 6, "workers": 1},
    "model": {"generator": {"blocks": 1, "filters": 4, "batch_norm": False, "bicubic_skip": True},
              "discriminator": {"filters": 4, "dense": 8, "batch_norm": True}},
    "loss": {"w_mse": 1.0, "w_vgg": 0.01, "w_adv": 0.001},
    "vgg": {"layer": "block1_conv2", "weights": "random"},
    "train": {"batch_size": 4, "hr_patch": 16, "log_every": 2, "val_every": 5, "checkpoint_every": 2,
              "val_images": 2, "distribute": "none"},
    "pretrain": {"steps": 6},
    "gan": {"steps": 4},
    "evaluate": {"tile": 16, "tile_overlap": 4, "zoom": 16},
    "tune": {"gan_steps": 4, "report_every": 2, "objectives": ["psnr_y"], "w_mse": [0.01, 10.0],
             "w_vgg": [0.0001, 1.0], "d_lr": []},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with the most end-to-end (slow) tests first, keeping the order inside each file: with
    ``make test``'s --dist loadscope a file is one unit of work, and the longest ones started last
    leave the other worker idle at the end. (xdist's own reorder, off in the Makefile, puts the files
    with the most tests first: unit files, so the few-test pipeline files came last.)"""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + (item.get_closest_marker("slow") is not None)
    order = {name: i for i, name in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.module.__name__], order[item.module.__name__]))


@pytest.fixture(autouse=True)
def _float32_policy_after_each_test():
    """Training sets Keras' global precision policy (``train.precision: auto`` picks mixed_bfloat16
    on CPUs with AVX512-BF16/AMX) for the whole process; later tests must build in float32."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


def tiny_config(**overrides) -> config.Config:
    """The tiny test config, with dotted-key overrides."""
    cfg = config.from_dict(TINY)
    return config.replace(cfg, overrides) if overrides else cfg


@pytest.fixture
def tiny_cfg() -> config.Config:
    return tiny_config()


def write_params(path: Path, **overrides) -> Path:
    """A complete params file: the project's params.yaml with TINY and dotted ``overrides`` laid over."""
    import yaml

    path.write_text(yaml.safe_dump(tiny_config(**overrides).to_dict(), sort_keys=False))
    return path


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _environment_unchanged_by_each_test():
    """A test that leaves SRGAN_VERBOSE set makes every later test's subprocesses verbose (their
    one-line errors then come with debug lines): fail the test that leaked it, not a later one."""
    before = os.environ.get("SRGAN_VERBOSE")
    yield
    leaked = os.environ.get("SRGAN_VERBOSE")
    if leaked != before:
        os.environ.pop("SRGAN_VERBOSE", None) if before is None else os.environ.update(SRGAN_VERBOSE=before)
        pytest.fail(f"the test left SRGAN_VERBOSE={leaked!r} (was {before!r}); use monkeypatch.setenv")


def make_raw(raw: Path, side: int = 96) -> Path:
    """data/raw-like folder: real photos (from the scikit-image wheel) cut to small sizes."""
    from PIL import Image

    for split, names in (("train", SKIMAGE_PHOTOS[:3]), ("valid", SKIMAGE_PHOTOS[3:])):
        (raw / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            im = Image.open(skimage_data_dir() / name).convert("RGB")
            w, h = im.size
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            im.crop(box).save(raw / split / (Path(name).stem + ".png"))
    return raw


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory) -> Path:
    """A tiny data/processed built by the real preprocess stage core (once per session)."""
    from srgan.preprocess import preprocess

    root = tmp_path_factory.mktemp("data")
    raw = make_raw(root / "raw")
    preprocess(tiny_config(), raw, root / "processed", workers=1)
    return root / "processed"


@pytest.fixture(scope="session")
def pretrained(processed_dir, tmp_path_factory) -> Path:
    """What the pretrain stage leaves for the adversarial phase, on the tiny config:
    ``models/srresnet.keras`` and ``reports/pretrain/summary.json`` under the returned folder."""
    from srgan import dataio
    from srgan.trainer import TrainData, train

    root = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_config()
    trainer, result = train(cfg, "pretrain", TrainData.load(processed_dir, 1))
    trainer.export_generator(root / "models" / "srresnet.keras")
    dataio.write_json_atomic(root / "reports" / "pretrain" / dataio.SUMMARY_NAME,
                             {"run_id": "pretrain-fixture", "total_steps": result.total_steps, **result.val})
    return root


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def project_files(dst: Path) -> Path:
    """Copy the repository's files that git would carry (tracked or not ignored) to ``dst``."""
    import subprocess

    root = config.ROOT
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = root / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


# A fresh clone's state: no pipeline outputs, lock file or stores from the working tree (data/own/
# stays: its README placeholders are in git and are the folder source's DVC deps)
CLONE_ABSENT = ("models", "reports", "dvc.lock", "mlflow.db", "mlartifacts", "optuna")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def dvc_env(tmp_path: Path) -> dict[str, str]:
    """The environment DVC runs the project in: the venv's ``python``/``dvc`` first (dvc.yaml says
    ``python``), a git identity, and no store override, so runs land in the project's own mlflow.db."""
    import sys

    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **GIT_IDENTITY, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(name, None)
    return env


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    """Run a command; fail the test with its output if it fails; return stdout + stderr."""
    import subprocess

    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A fresh-clone-like git copy of the project on a tiny params.yaml after one real ``dvc repro``
    (its own mlflow.db): (folder, the repro's log). Shared: tests work on copies (``reproduced_copy``)."""
    import yaml

    proj = project_files(tmp_path_factory.mktemp("reproduced") / "project")
    for p in [proj / name for name in CLONE_ABSENT] + [p for p in (proj / "data").iterdir() if p.name != "own"]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    # the sample photos are large: a few 64-px crops, 64-px validation images
    cfg = tiny_config(**{"data.source": "sample", "preprocess.hr_crop": 64, "preprocess.valid_max_side": 64})
    (proj / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env = dvc_env(proj.parent)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        run_ok(cmd, proj, env)
    return proj, run_ok(["dvc", "repro"], proj, env)


@pytest.fixture
def reproduced_copy(reproduced, tmp_path) -> Path:
    """This test's own copy of the reproduced project (git, DVC cache and store included)."""
    dst = tmp_path / "project"
    shutil.copytree(reproduced[0], dst, symlinks=True)
    return dst


def noise_valid_dir(root: Path, n: int, seed: int) -> Path:
    """A validation folder (hr/, lr/ at x4) of ``n`` random 32-px images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d in ("hr", "lr"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(hr).save(root / "hr" / f"im{i}.png")
        Image.fromarray(hr[::4, ::4]).save(root / "lr" / f"im{i}.png")
    return root


def assert_uint8_image(a: np.ndarray, shape: tuple[int, ...]) -> None:
    assert a.dtype == np.uint8 and a.shape == shape, (a.dtype, a.shape)
