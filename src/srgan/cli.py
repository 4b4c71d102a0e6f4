"""Shared command-line plumbing: logging and clear one-line errors for expected failures."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from . import config, quiet
from .config import PARAMS_PATH, ROOT, Config, ConfigError
from .errors import ExpectedError

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's codes for a death by that signal
EXIT_TERMINATED = 128 + signal.SIGTERM
RESUME_HINT = "the last checkpoint is kept; run the same command again to resume"
PACKAGE_LOGGER = __package__  # "srgan": the parent of every module's logger


class UserError(ExpectedError, RuntimeError):
    """An expected failure with a message for the user (no traceback); the package's own modules
    raise their own ``errors.ExpectedError`` subclasses instead of this one."""


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: it unwinds like Ctrl-C, so a training run ends KILLED with its
    checkpoint kept (``tracking.run_context``) instead of the process vanishing mid-step."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once if cleanup hangs
    raise Terminated()


def parser(doc: str | None, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Argument parser of a stage script: its docstring as help, and ``--params``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=parents or [])
    ap.add_argument("--params", default=str(PARAMS_PATH), help="params file (default: params.yaml)")
    quiet.add_verbose_option(ap)
    return ap


def setup_logging(verbose: bool = False) -> None:
    """Log lines with a timestamp; TensorFlow's C++ start-up chatter held back (:mod:`srgan.quiet`)
    unless verbose (``verbose``, ``--verbose`` or ``SRGAN_VERBOSE=1``), which also shows the
    project's debug lines. Call it before TensorFlow is imported."""
    if verbose:
        quiet.set_verbose()
    quiet.quiet_native_startup()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if quiet.verbose():  # the project's own debug lines, not every library's
        logging.getLogger(PACKAGE_LOGGER).setLevel(logging.DEBUG)
    for noisy in ("alembic", "mlflow", "urllib3", "absl", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def use_onednn(enabled: bool) -> str:
    """Choose TensorFlow's oneDNN CPU kernels for this process (``train.onednn``); returns the setting.

    TF reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import, and turns oneDNN on by itself only on CPUs
    with AVX512-VNNI/BF16/AMX; on AVX2 CPUs it makes training steps ~3x faster (``make bench``).
    An explicit ``TF_ENABLE_ONEDNN_OPTS`` in the environment wins over the param.
    """
    want = "1" if enabled else "0"
    have = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if have is not None:
        if have != want:
            log.warning("TF_ENABLE_ONEDNN_OPTS=%s from the environment overrides train.onednn: %s",
                        have, enabled)
        return have
    if "tensorflow" in sys.modules:  # too late to change; report what this process runs with
        log.warning("TensorFlow already imported: train.onednn has no effect here")
        return "unset"
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = want
    return want


def run_main(main: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Call ``main``; expected errors print ``error: ...`` and exit 1 instead of a traceback.

    SIGTERM (``kill``, schedulers, container stops) is handled like Ctrl-C: one line, exit 143.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main()
    except (ConfigError, ExpectedError, FileNotFoundError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "exit_at_once", False):
            # e.g. a lost peer worker: TensorFlow's collective runtime is broken, and the normal
            # interpreter teardown can hang on it or print its threads' errors after ours
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)
    except Terminated:
        print(f"terminated (SIGTERM): {RESUME_HINT}", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        print(f"interrupted: {RESUME_HINT}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if in_main_thread and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stage(main: Callable[[Config, argparse.Namespace], object], doc: str | None, paths: dict[str, str], *,
          onednn: bool = False, expected: tuple[type[BaseException], ...] = (),
          parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Run a DVC stage script: ``--params`` plus one ``--<name> PATH`` option per entry of ``paths``
    (defaults relative to the project root; dvc.yaml spells them out), logging, the validated config,
    and one-line errors. ``onednn``: apply ``train.onednn`` before TensorFlow is imported;
    ``parents``: parsers with the script's other options."""
    ap = parser(doc, parents)
    for name, default in paths.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, default=ROOT / default, help=f"default: {default}")
    args = ap.parse_args()
    setup_logging()

    def run() -> None:
        cfg = config.load(args.params)
        if onednn:
            use_onednn(cfg.train.onednn)  # before TensorFlow is imported
        main(cfg, args)

    run_main(run, expected)


# `srgan <command>`: the installed command; each runs the script of the same name in src/ (the DVC
# stage entry points and tools stay the one implementation, the command only finds them).
COMMANDS = {
    "upscale": ("upscale", "upscale images with a trained generator (path, runs:/, models:/)"),
    "export": ("export", "export a generator: SavedModel, ONNX, LiteRT"),
    "tune": ("tune", "Optuna search over the Per-Pix loss weights"),
    "study": ("compare", "the loss study (--run) and its report"),
    "mos": ("mos", "blind mean-opinion-score rating: prepare, serve, results"),
    "bench": ("bench", "speed benchmark"),
    "fetch": ("fetch", "pipeline stage: fetch data"),
    "preprocess": ("preprocess", "pipeline stage: preprocess"),
    "pretrain": ("pretrain", "pipeline stage: SRResNet pre-training"),
    "train": ("train", "pipeline stage: adversarial training"),
    "evaluate": ("evaluate", "pipeline stage: evaluate"),
}
SCRIPTS = Path(__file__).resolve().parents[1]  # src/: the scripts beside the package


def main(argv: list[str] | None = None) -> None:
    """``srgan <command> [args]``: run one of the project's scripts with ``args``."""
    import runpy

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [quiet.VERBOSE_FLAG]:  # `srgan --verbose <command>`: as the command's own
        quiet.set_verbose()
        argv = argv[1:]
    usage = (f"usage: srgan [{quiet.VERBOSE_FLAG}] <command> [options]"
             "   (srgan <command> --help for its options)\n\ncommands:\n"
             + "\n".join(f"  {name:<11} {doc}" for name, (_, doc) in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage}", file=sys.stderr)
        sys.exit(2)
    script = SCRIPTS / f"{COMMANDS[name][0]}.py"
    if not script.is_file():
        print(f"error: {script} not found: the srgan command runs the scripts of a checkout "
              "(install with `pip install -e .` from the repository)", file=sys.stderr)
        sys.exit(1)
    sys.argv = [f"srgan {name}", *rest]
    runpy.run_path(str(script), run_name="__main__")
