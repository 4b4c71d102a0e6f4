"""Upscaling image files in a batch: plan every output first, then upscale one file at a time.

Everything that can be known without running the model is checked before the first image is
upscaled, so a mistake costs seconds, not the whole batch:

* the output folder is a folder we can write (not a file, not read-only);
* folder arguments that are, or lie inside, the output folder are refused by name (their
  outputs would be read back as inputs);
* each output path: files found in a folder argument keep their sub-path under the output folder
  (``in/2020/a.png`` -> ``out/2020/a_x4.png``), files named explicitly go to its top; two inputs
  that would write the same output, and outputs that already exist (unless ``overwrite``), are
  refused per file instead of overwriting anything;
* the size of each image, from its header only: inputs over ``max_pixels`` LR pixels are refused
  (a small PNG can decode to a huge image, and its output costs scale^2 x 3 bytes per LR pixel).

One bad file never stops the others; each output is written atomically (``images.save_png``), so
an interrupted batch leaves only whole files.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits

# Extensions picked up when a folder is given (files named explicitly are always tried).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm", ".tga"}
)
# Largest LR input accepted by default (see limits.UPSCALE_MAX_PIXELS); larger inputs need --max-pixels.
DEFAULT_MAX_PIXELS = limits.UPSCALE_MAX_PIXELS


# A write that failed with one of these will fail for every later image too: the batch stops there.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class BatchError(ValueError):
    """A problem that stops the whole batch before any work (e.g. the output folder is a file)."""


@dataclass
class FileResult:
    """Outcome of one input path: ``out`` on success, ``error`` (one line) on failure."""

    src: Path
    out: Path | None = None
    error: str | None = None
    lr_size: tuple[int, int] | None = None  # (width, height)
    sr_size: tuple[int, int] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Input:
    """An image to upscale and the sub-folder (relative to the output folder) its output goes to."""

    src: Path
    subdir: Path = Path()


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (stderr gets one line per file)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder (with parents) and check it is a writable folder; BatchError if not."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BatchError(f"--out {out}: folder is not writable")
    return out


def collect_inputs(
    paths: Iterable[str | os.PathLike[str]], exclude: Path | None = None
) -> tuple[list[Input], list[FileResult]]:
    """Expand files and folders (recursively, by :data:`IMAGE_EXTENSIONS`) into inputs.

    Returns (inputs in argument order, folders sorted, duplicates dropped; failures for
    arguments that do not exist, folders without images, and folders that are ``exclude`` (the
    output folder) or inside it). Files under ``exclude`` are skipped when walking a folder that
    contains it, so re-runs never upscale their own outputs.
    """
    found: list[Input] = []
    failures: list[FileResult] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None

    def add(item: Input) -> None:
        key = item.src.resolve()
        if key not in seen:
            seen.add(key)
            found.append(item)

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            if excl is not None and p.resolve().is_relative_to(excl):
                what = "is the output folder" if p.resolve() == excl else "is inside the output folder"
                failures.append(FileResult(p, error=f"{what} (--out {exclude}): its images would mix with "
                                                     "the outputs; choose another --out"))
                continue
            images, odd = _walk(p)
            failures += [FileResult(q, error=why) for q, why in odd]
            hits = [q for q in images if excl is None or not q.resolve().is_relative_to(excl)]
            if not hits and not odd:
                why = ("contains no image files outside the output folder" if images
                       else "folder contains no image files")
                failures.append(FileResult(p, error=why))
            for q in hits:
                add(Input(q, q.parent.relative_to(p)))
        elif p.is_file():
            add(Input(p))
        else:
            failures.append(FileResult(p, error=not_a_file(p) or "no such file or folder"))
    return found, failures


def _walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` (sorted), and what looks like one but cannot be read as a file,
    or is a folder the walk does not enter (a symlink to a folder), each with the reason."""
    images: list[Path] = []
    odd: list[tuple[Path, str]] = []
    for q in sorted(folder.rglob("*")):
        named_like_image = q.suffix.lower() in IMAGE_EXTENSIONS
        if q.is_symlink() and q.is_dir():
            odd.append((q, (f"is a symlink to a folder ({os.readlink(q)}): not followed; give that folder "
                            "as an argument to upscale its images")))
        elif named_like_image:
            why = not_a_file(q)
            if why is None:
                images.append(q)
            else:
                odd.append((q, why))
    return images, odd


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file (a folder, a FIFO, a symlink loop, ...), or None
    for a regular file (or a symlink to one). Never opens it: reading a FIFO waits for a writer."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop: not read"
        if path.is_symlink():
            return f"is a broken symlink (to {os.readlink(path)}, which does not exist): not read"
        if exc.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder named like an image, not an image (the images in it are upscaled as usual)"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file: not read (reading it would wait for a writer)"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file: not read"
    return "is a device, not a file: not read"


@contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``limit`` (None: off) inside the block.

    PIL warns above its limit and refuses above twice it; here the batch's own ``max_pixels``
    check decides, so PIL must neither refuse an accepted image nor stop the header read of one
    that is about to be refused with a better message.
    """
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (no pixel decoding), or None if PIL cannot tell."""
    from PIL import Image

    with _pil_pixel_limit(None):
        try:
            with Image.open(path) as im:
                return im.size
        except Exception:  # noqa: BLE001 - unreadable files get load_rgb's precise message later
            return None


def _size_error(size: tuple[int, int], scale: int, max_pixels: int) -> str | None:
    return limits.pixel_limit_error(*size, max_pixels, scale, raise_hint="raise --max-pixels to upscale it")


@dataclass(frozen=True)
class Job:
    """One planned upscale: input, output path, LR size from the header (if readable)."""

    src: Path
    out: Path
    size: tuple[int, int] | None


def plan(
    inputs: Sequence[Input], out_dir: Path, scale: int, overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Job], list[FileResult]]:
    """Output paths of ``inputs`` and the ones refused before any work (collision, existing output,
    too large). The first input claiming an output path keeps it."""
    jobs: list[Job] = []
    refused: list[FileResult] = []
    claimed: dict[str, Path] = {}
    for item in inputs:
        out = out_dir / item.subdir / f"{item.src.stem}_x{scale}.png"
        key = str(out).casefold()  # a.PNG and a.png are one file on case-insensitive file systems
        size = image_size(item.src)
        if key in claimed:
            error = f"output {out} is also the output of {claimed[key]}; upscale one of them into another --out"
        else:
            claimed[key] = item.src  # also when refused below: a second input still collides with it
            if out.is_dir():
                error = f"output {out} is a folder"
            elif out.exists() and not overwrite:
                error = f"output {out} already exists (--overwrite replaces it)"
            else:
                error = _size_error(size, scale, max_pixels) if size else None
        if error:
            refused.append(FileResult(item.src, error=error, lr_size=size))
        else:
            jobs.append(Job(item.src, out, size))
    return jobs, refused


def upscale_files(
    model: Any,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    tile: int = 0,
    overlap: int = 16,
    scale: int | None = None,
    batch: int = 1,
    on_result: Callable[[FileResult], None] | None = None,
    self_ensemble: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[FileResult]:
    """Upscale every image in ``paths`` (files or folders) into ``out_dir`` (see the module docstring).

    Failures (missing, unreadable or too large input, output collision or already there, write
    error, model error) are recorded per file and never stop the others; every refusal that needs
    no model is reported before the first image is upscaled. ``scale`` defaults to the model's
    (``inference.infer_scale``). ``on_result`` is called as each file finishes. Raises BatchError if
    ``out_dir`` cannot be the output folder.
    """
    # Imported here so that planning (and its errors) does not wait for TensorFlow.
    from srgan import images, inference

    out_dir = prepare_out_dir(out_dir)
    scale = inference.infer_scale(model) if scale is None else int(scale)
    inputs, results = collect_inputs(paths, exclude=out_dir)
    jobs, refused = plan(inputs, out_dir, scale, overwrite=overwrite, max_pixels=max_pixels)
    results += refused
    for r in results:
        if on_result:
            on_result(r)
    out_full: str | None = None  # set when --out has no room left: the rest are not computed
    for job in jobs:
        t0 = time.perf_counter()
        res = FileResult(job.src)
        if out_full is not None:
            res.error = out_full
        else:
            try:
                # The size check above decided: PIL must not refuse (or warn about) an accepted image.
                with _pil_pixel_limit(max(max_pixels, _pil_default_limit())):
                    lr = images.load_rgb(job.src)
                res.lr_size = (lr.shape[1], lr.shape[0])
                sr = inference.upscale(model, lr, scale, tile=tile, overlap=overlap, batch=batch,
                                       self_ensemble=self_ensemble)
                res.sr_size = (sr.shape[1], sr.shape[0])
                # Never replaces a file another process wrote meanwhile, unless --overwrite.
                images.save_png(job.out, sr, replace=overwrite)
                res.out = job.out
            except images.ImageError as exc:
                # load_rgb names the file itself; callers print the path, so drop the repeat.
                res.error = _one_line(exc).removeprefix(f"{job.src}: ")
            except FileExistsError:
                res.error = (f"output {job.out} appeared while this image was upscaled (another upscale into "
                             "the same --out?): kept it, this result was not written; --overwrite replaces it")
            except OSError as exc:
                res.error = f"{type(exc).__name__}: {_one_line(exc)}"
                if exc.errno in OUT_OF_SPACE:
                    out_full = (f"not upscaled: {out_dir} is out of space ({exc.strerror}); free some and run "
                                "again (the outputs written so far are kept and are not redone)")
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop a batch
                res.error = f"{type(exc).__name__}: {_one_line(exc)}"
        res.seconds = time.perf_counter() - t0
        results.append(res)
        if on_result:
            on_result(res)
    return results


def _pil_default_limit() -> int:
    """PIL's own decompression-bomb limit (pixels) as configured in this process."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0)


def summarize(results: Sequence[FileResult], out_dir: Path, scale: int | None = None) -> str:
    """One summary line for a batch run."""
    ok = sum(r.ok for r in results)
    bad = len(results) - ok
    secs = sum(r.seconds for r in results)
    sx = f" x{scale}" if scale else ""
    return f"upscaled{sx}: {ok} written, {bad} failed, {secs:.1f}s -> {out_dir}"
