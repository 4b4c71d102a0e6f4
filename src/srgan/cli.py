"""Shared command-line plumbing: logging and clear one-line errors for expected failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from . import config
from .config import PARAMS_PATH, ROOT, Config, ConfigError

log = logging.getLogger(__name__)


class UserError(RuntimeError):
    """An expected failure with a message for the user (no traceback)."""


def parser(doc: str | None, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Argument parser of a stage script: its docstring as help, and ``--params``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=parents or [])
    ap.add_argument("--params", default=str(PARAMS_PATH), help="params file (default: params.yaml)")
    return ap


def setup_logging(verbose: bool = False) -> None:
    """Log lines with a timestamp; keep TensorFlow's C++ chatter down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
    """Call ``main``; expected errors print ``error: ...`` and exit 1 instead of a traceback."""
    try:
        main()
    except (ConfigError, UserError, FileNotFoundError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


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
