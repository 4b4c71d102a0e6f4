"""Build and load a rating study.

A study is a folder::

    study.json          stimulus id -> image, method, run id, crop box (never served to raters)
    stimuli/<id>.png    one PNG per (image, method); <id> is random hex, so a file name or a URL
                        says nothing about the method behind it

Blinding beyond the name: the stimuli of an image are written in a random method order and all
get one common mtime, so neither disk order nor timestamps follow the method; and every stimulus
is an *uncompressed* PNG (``blind_png``), so its byte size is a function of its width and height
only. A compressed PNG would name the method by its size (nearest neighbour compresses best, the
HR original worst). The app serves the file bytes verbatim, so every stimulus of an image has the
same Content-Length and the same chunk layout: what differs between methods is only the pixels,
i.e. what is being rated. ``blinding_problems`` checks that before anything is served. The price
is about 3 bytes per pixel (a 192 px crop is 111 KB; a whole 2K image some 8 MB).

Every method of an image is shown on the same crop box, so raters compare like with like. The
study is written to a temporary sibling folder and renamed into place: a half-built study never
looks whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from srgan import dataio, viz
from srgan.images import ImageError, Pair, iter_pairs, pair_files  # `images` is a parameter here
from srgan.images import upscale_bicubic as _project_bicubic

# (lr uint8 HxWx3, scale) -> sr uint8 (H*scale)x(W*scale)x3
Upscaler = Callable[[np.ndarray, int], np.ndarray]

FORMAT = 1
CALIBRATION = ("nearest", "bicubic", "hr")  # the paper's reference methods
# LR pixels of context kept around a crop before upscaling, so a crop's border is not an image
# border for the model: at least the generator's receptive-field radius (models.receptive_radius: 40
# LR px for the paper's SRResNet, 349 for ESRGAN's RRDB); src/mos.py uses max(this, evaluate.tile_overlap),
# so a big generator's tile_overlap covers it too; bicubic needs 2.
CONTEXT_LR = 48
STIMULUS_ID = re.compile(r"^[0-9a-f]{16}$")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUN_SPEC = re.compile(r"^runs:/([A-Za-z0-9_-]+)(?:/model)?/?$")
REGISTRY_PREFIX = "models:/"  # NAME=models:/<name>@<alias> or models:/<name>/<version>
MODEL_SUFFIX = ".keras"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_RGB8 = (8, 2, 0, 0, 0)  # IHDR: 8 bits, colour type 2 (RGB), deflate, standard filters, no interlace
PNG_FILTER_NONE = 0


class StudyError(ValueError):
    """A study cannot be built or read (missing data, bad shapes, bad names)."""


@dataclass(frozen=True)
class Stimulus:
    id: str
    image: str
    method: str
    file: str
    run_id: str | None = None
    width: int = 0
    height: int = 0


@dataclass
class Study:
    root: Path
    study_id: str
    scale: int
    crop: int
    images: list[str]
    methods: dict[str, dict]
    stimuli: dict[str, Stimulus]
    meta: dict = field(default_factory=dict)

    @property
    def stimuli_dir(self) -> Path:
        return self.root / "stimuli"

    def servable_file(self, stim_id: str) -> Path | None:
        """The PNG of a stimulus id, or None: only plain files inside stimuli/ are ever served."""
        stim = self.stimuli.get(stim_id)
        if stim is None:
            return None
        path = (self.stimuli_dir / stim.file).resolve()
        # Defence in depth: even a tampered study.json cannot point outside stimuli/.
        if not path.is_relative_to(self.stimuli_dir.resolve()) or path.suffix != ".png" or not path.is_file():
            return None
        return path

    def method_order(self) -> list[str]:
        """Nearest, bicubic, the models (as given), HR: worst anchor to best anchor."""
        models = [m for m in self.methods if m not in CALIBRATION]
        return ["nearest", "bicubic", *models, "hr"]


@dataclass
class ModelMethod:
    """A model to rate: a name, how to upscale, and where it came from."""

    name: str
    upscale: Upscaler
    source: str = ""
    run_id: str | None = None


# -- calibration methods -------------------------------------------------------------------------


# The project's one bicubic (PIL, a = -0.5, float32 per channel, rounded once), so the study's
# bicubic anchor is pixel for pixel the evaluation's bicubic baseline.
upscale_bicubic: Upscaler = _project_bicubic


# -- helpers -------------------------------------------------------------------------------------


def parse_model_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME=PATH``, ``NAME=runs:/RUN_ID[/model]`` or ``NAME=models:/MODEL@ALIAS|/VERSION`` ->
    (name, path or models:/ URI or None, run id or None)."""
    name, sep, target = spec.partition("=")
    if not sep or not name or not target:
        raise StudyError(f"--model {spec!r}: expected NAME=PATH.keras, NAME=runs:/RUN_ID "
                         "or NAME=models:/MODEL@ALIAS")
    check_method_name(name)
    m = RUN_SPEC.match(target)
    if m:
        return name, None, m.group(1)
    if target.startswith("runs:/"):
        raise StudyError(f"--model {spec!r}: expected runs:/RUN_ID or runs:/RUN_ID/model")
    return name, target, None


def check_method_name(name: str) -> None:
    if name in CALIBRATION:
        raise StudyError(f"model name {name!r} is reserved for a calibration method ({', '.join(CALIBRATION)})")
    if not METHOD_NAME.match(name):
        raise StudyError(f"model name {name!r}: use letters, digits, '_', '.', '-' (max 64)")


def keras_upscaler(path: Path, tile: int = 0, overlap: int = 16) -> Upscaler:
    """Load a .keras generator (safe mode) and wrap the project's tiled inference."""
    from srgan import inference, models  # lazy: TensorFlow only when a model is rated

    model = models.load_generator(path)

    def run(lr: np.ndarray, scale: int) -> np.ndarray:
        return inference.upscale(model, lr, scale, tile=tile, overlap=overlap)

    return run


def model_method(spec: str, tile: int = 0, overlap: int = 16) -> ModelMethod:
    """Resolve a ``--model`` spec, downloading the generator of an MLflow run or registered model if needed.

    Anything that is not a loadable generator is a StudyError naming the spec, not a traceback.
    """
    name, path, run_id = parse_model_spec(spec)
    if run_id is not None or (path or "").startswith(REGISTRY_PREFIX):
        from srgan import tracking  # lazy: MLflow only for URIs

        uri = path if run_id is None else f"runs:/{run_id}"
        try:
            local = tracking.resolve_generator(uri)
            run_id = tracking.generator_run_id(uri)  # a registered version's run gets the MOS too
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for "no such run/artifact"
            raise StudyError(f"--model {spec!r}: cannot download the generator of {uri}: {exc}") from None
        source = uri
    else:
        local = Path(path)  # type: ignore[arg-type]
        source = str(local)
        if not local.is_file():
            raise StudyError(f"--model {spec!r}: {local} is not a file")
    # Checked before TensorFlow is imported: a .keras file is a zip archive.
    if local.suffix != MODEL_SUFFIX or not zipfile.is_zipfile(local):
        raise StudyError(f"--model {spec!r}: {local} is not a Keras model file (a {MODEL_SUFFIX} archive)")
    try:
        upscale = keras_upscaler(local, tile, overlap)
    except ImportError:
        raise  # a missing TensorFlow is not a bad model file
    except Exception as exc:  # noqa: BLE001 - keras raises ValueError, KeyError, OSError... for bad archives
        raise StudyError(f"--model {spec!r}: {local} is not a loadable generator: "
                         f"{type(exc).__name__}: {exc}") from None
    return ModelMethod(name, upscale, source=source, run_id=run_id)


def _pairs(valid_dir: Path, stems: list[str]) -> Iterator[Pair]:
    """The chosen validation pairs; a missing or broken file is a StudyError naming it."""
    try:
        yield from iter_pairs(valid_dir, names=stems)
    except (ImageError, FileNotFoundError, ValueError) as exc:
        raise StudyError(str(exc)) from None


def crop_box(h: int, w: int, crop: int, scale: int) -> tuple[int, int, int, int]:
    """Centered HR box (x0, y0, x1, y1), on the LR grid, of side ``crop`` (0 = whole image)."""
    if crop <= 0:
        return 0, 0, w, h
    side = min(crop, h, w) // scale * scale
    if side <= 0:
        raise StudyError(f"image {w}x{h} is too small for a crop at scale {scale}")
    x0 = (w - side) // 2 // scale * scale
    y0 = (h - side) // 2 // scale * scale
    return x0, y0, x0 + side, y0 + side


def _upscale_box(up: Upscaler, lr: np.ndarray, box: tuple[int, int, int, int], scale: int, name: str,
                 context: int = CONTEXT_LR) -> np.ndarray:
    """Upscale the LR region under ``box`` with ``context`` px around it, then cut the box out."""
    x0, y0, x1, y1 = (v // scale for v in box)
    lh, lw = lr.shape[:2]
    cx0, cy0 = max(0, x0 - context), max(0, y0 - context)
    cx1, cy1 = min(lw, x1 + context), min(lh, y1 + context)
    patch = np.ascontiguousarray(lr[cy0:cy1, cx0:cx1])
    sr = np.asarray(up(patch, scale))
    want = (patch.shape[0] * scale, patch.shape[1] * scale, 3)
    if sr.shape != want or sr.dtype != np.uint8:
        raise StudyError(f"method {name!r} returned {sr.dtype} {sr.shape}, expected uint8 {want}")
    oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
    return sr[oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blind_png(img: np.ndarray) -> bytes:
    """``uint8`` HxWx3 -> an uncompressed PNG whose size and chunk layout depend on its shape alone.

    Filter type None on every row and deflate level 0 (stored blocks, which never look at the
    data), one IDAT, no ancillary chunks: the length is a function of (width, height) alone, so
    stimuli of one image have identical sizes and chunk layouts whatever method made them.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise StudyError(f"stimulus must be uint8 HxWx3, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = PNG_FILTER_NONE
    rows[:, 1:] = img.reshape(h, 3 * w)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">II5B", w, h, *PNG_RGB8))
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)) + _png_chunk(b"IEND", b""))


def blinding_problems(study: Study) -> list[str]:
    """Images whose servable stimuli differ in byte size (so size would name the method); [] if none."""
    sizes: dict[str, set[int]] = {}
    for sid, stim in study.stimuli.items():
        path = study.servable_file(sid)
        if path is not None:
            sizes.setdefault(stim.image, set()).add(path.stat().st_size)
    return sorted(img for img, s in sizes.items() if len(s) > 1)


# -- build / load --------------------------------------------------------------------------------


def prepare_study(
    valid_dir: Path,
    out_dir: Path,
    models: list[ModelMethod] | None = None,
    *,
    crop: int = 0,
    images: int = 0,
    seed: int = 42,
    force: bool = False,
    context: int = CONTEXT_LR,
    log: Callable[[str], None] = print,
) -> Study:
    """Write a study of ``images`` validation images (0 = all) x (calibration + ``models``).

    ``context``: LR px upscaled around a crop and thrown away (>= the models' receptive field).
    """
    valid_dir, out_dir = Path(valid_dir), Path(out_dir)
    models = list(models or [])
    names = [m.name for m in models]
    for n in names:
        check_method_name(n)
    if len(set(names)) != len(names):
        raise StudyError(f"model names must be unique, got {names}")
    if out_dir.exists() and not force:
        raise StudyError(f"{out_dir} already exists; pass --force to replace it "
                         "(its ratings stay in the database under the old study id)")
    if crop < 0 or images < 0:
        raise StudyError("--crop and --images must be >= 0")

    try:
        stems = [p.stem for p in pair_files(valid_dir)]
    except FileNotFoundError as exc:
        raise StudyError(str(exc)) from None
    if images and images < len(stems):
        # Seeded sample, kept in name order: reproducible and not biased to the first files.
        stems = sorted(random.Random(seed).sample(stems, images))

    methods: dict[str, dict] = {
        "nearest": {"kind": "nearest", "source": "", "run_id": None},
        "bicubic": {"kind": "bicubic", "source": "", "run_id": None},
        **{m.name: {"kind": "model", "source": m.source, "run_id": m.run_id} for m in models},
        "hr": {"kind": "hr", "source": "", "run_id": None},
    }
    upscalers: dict[str, Upscaler] = {"nearest": viz.upscale_nearest, "bicubic": upscale_bicubic}
    upscalers.update({m.name: m.upscale for m in models})

    created = datetime.now(timezone.utc).replace(microsecond=0)
    shuffler = random.SystemRandom()  # not the seed: the write order must not be reproducible
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "stimuli").mkdir()
        stimuli: dict[str, dict] = {}
        scale = None
        for pair in _pairs(valid_dir, stems):
            stem, hr, lr = pair.name, pair.hr, pair.lr
            s = hr.shape[0] // lr.shape[0]
            if scale is None:
                scale = s
            elif s != scale:
                raise StudyError(f"{stem}: scale {s} differs from the other images' scale {scale}")
            box = crop_box(hr.shape[0], hr.shape[1], crop, scale)
            # A random method order per image: the order files are written in (inode numbers,
            # directory order) must not follow the method.
            for name in shuffler.sample(list(methods), len(methods)):
                info = methods[name]
                if name == "hr":
                    img = hr[box[1] : box[3], box[0] : box[2]]
                else:
                    img = _upscale_box(upscalers[name], lr, box, scale, name, context)
                sid = secrets.token_hex(8)
                while sid in stimuli:  # pragma: no cover - 64-bit collision
                    sid = secrets.token_hex(8)
                dataio.write_bytes_atomic(tmp / "stimuli" / f"{sid}.png", blind_png(img))
                stimuli[sid] = {
                    "image": stem, "method": name, "run_id": info["run_id"], "file": f"{sid}.png",
                    "box": list(box), "width": int(img.shape[1]), "height": int(img.shape[0]),
                }
            log(f"  {stem}: {len(methods)} stimuli, box {box}")
        # One mtime for every stimulus: write times would order them by method within an image.
        stamp = created.timestamp()
        for entry in stimuli.values():
            os.utime(tmp / "stimuli" / entry["file"], (stamp, stamp))
        meta = {
            "format": FORMAT,
            "study_id": secrets.token_hex(8),
            "created": created.isoformat(timespec="seconds"),
            "source": str(valid_dir),
            "scale": scale,
            "crop": crop,
            "seed": seed,
            "images": stems,
            "methods": methods,
            "stimuli": stimuli,
        }
        (tmp / "study.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():  # force: swap in the new study, then drop the old one
            old = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"study {meta['study_id']}: {len(stimuli)} stimuli ({len(stems)} images x {len(methods)} methods) in {out_dir}")
    return load_study(out_dir)


def load_study(study_dir: Path) -> Study:
    """Read and check study.json; stimulus files must be plain names inside stimuli/."""
    study_dir = Path(study_dir)
    path = study_dir / "study.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path} not found; run `python src/mos.py prepare` first") from None
    except json.JSONDecodeError as exc:
        raise StudyError(f"{path}: not valid JSON: {exc}") from None
    return study_from_meta(study_dir, meta, str(path))


def study_from_meta(study_dir: Path, meta: dict, source: str = "study.json") -> Study:
    """A Study from its study.json contents (``source`` names them in errors): the folder's, or a
    version the rating app recorded in the ratings database (``db.load_study_meta``)."""
    path = source
    if meta.get("format") != FORMAT:
        raise StudyError(f"{path}: unsupported study format {meta.get('format')!r}")
    stimuli = {}
    for sid, s in meta["stimuli"].items():
        if not STIMULUS_ID.match(sid) or s["method"] not in meta["methods"]:
            raise StudyError(f"{path}: bad stimulus entry {sid!r}")
        stimuli[sid] = Stimulus(sid, s["image"], s["method"], s["file"], s.get("run_id"),
                                int(s.get("width", 0)), int(s.get("height", 0)))
    return Study(study_dir, meta["study_id"], int(meta["scale"]), int(meta["crop"]), list(meta["images"]),
                 dict(meta["methods"]), stimuli, meta)
