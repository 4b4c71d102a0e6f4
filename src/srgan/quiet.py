"""Commands print their own output: what native libraries print on their own at start-up
(TensorFlow's absl and oneDNN notices, its cpu_feature_guard lines, LiteRT's delegate notice) is
held back unless the command is verbose (``--verbose``, or ``SRGAN_VERBOSE=1`` in the environment).

TensorFlow's C++ code writes these straight to file descriptor 2 while ``import tensorflow`` runs.
``TF_CPP_MIN_LOG_LEVEL`` >= 1 silences most, but not all: with ``TF_ENABLE_ONEDNN_OPTS=1``
(``train.onednn``) the oneDNN notice and absl's "before absl::InitializeLog()" warning come twice
whatever the level (measured with TF 2.21). So, when not verbose, the first import of TensorFlow
runs with descriptor 2 captured (:func:`native_stderr_held`) while Python's own ``sys.stderr``
(warnings, the logging handlers, ``print``) keeps writing to the real stderr. Held text is written
out if the block fails (it may say why) or once the process turns verbose, else dropped.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, TextIO

VERBOSE_ENV = "SRGAN_VERBOSE"  # "1": verbose, for this process and the processes it starts
VERBOSE_FLAG = "--verbose"  # every command's option
NOT_VERBOSE = ("", "0", "false", "no", "off")  # values of VERBOSE_ENV that mean "not verbose"
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
TF_QUIET_LEVEL = "2"  # TensorFlow's INFO and WARNING lines off; its errors still shown
STARTUP_MODULES = ("tensorflow",)  # imported with file descriptor 2 captured (the first time)
STDERR_FD = 2


@dataclass
class _State:
    held: list[bytes] = field(default_factory=list)  # captured start-up output not written out (yet)
    level_set_here: bool = False  # TF_LOG_LEVEL_ENV was set by quiet_native_startup, not by the user


_state = _State()


def verbose() -> bool:
    """Whether this process is verbose (``--verbose`` or ``SRGAN_VERBOSE``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in NOT_VERBOSE


def set_verbose() -> None:
    """Make this process, and the processes it starts, verbose; what was held back so far is
    written out now, and TensorFlow's own log level is left to it if it is not imported yet."""
    os.environ[VERBOSE_ENV] = "1"
    if _state.level_set_here and not _imported(STARTUP_MODULES):
        os.environ.pop(TF_LOG_LEVEL_ENV, None)
        _state.level_set_here = False
    _hold(b"", show=True)


class VerboseAction(argparse.Action):
    """``--verbose``: :func:`set_verbose` as soon as the option is parsed, so it holds whatever the
    script does with its arguments next (and for the processes it starts)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)
        set_verbose()


def add_verbose_option(ap: argparse.ArgumentParser) -> None:
    """The ``--verbose`` option of every command."""
    ap.add_argument(VERBOSE_FLAG, action=VerboseAction,
                    help=f"also TensorFlow's start-up notices and debug lines (as {VERBOSE_ENV}=1)")


def quiet_native_startup() -> None:
    """Unless verbose: ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (for this process and the ones it
    starts), and the first import of TensorFlow runs with its native output held back. Call it
    before TensorFlow is imported; calling it again does nothing more."""
    if verbose():
        return
    if TF_LOG_LEVEL_ENV not in os.environ:
        os.environ[TF_LOG_LEVEL_ENV] = TF_QUIET_LEVEL
        _state.level_set_here = True
    if not _imported(STARTUP_MODULES) and not any(isinstance(f, _HeldImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _HeldImport(STARTUP_MODULES))


def _imported(names: Sequence[str]) -> bool:
    return all(name in sys.modules for name in names)


@contextmanager
def native_stderr_held() -> Iterator[None]:
    """Run the block with file descriptor 2 (what C and C++ code prints) going to a temporary file
    unless verbose, Python's ``sys.stderr`` and the logging handlers writing to it still reaching
    the real stderr. The captured text is written out when the block raises or once the process
    turns verbose (:func:`set_verbose`); otherwise it is dropped.

    Output that other threads' native code prints meanwhile is held back too.
    """
    if verbose():
        yield
        return
    _flush_python_stderr()  # what Python wrote before the block is not captured
    real = os.dup(STDERR_FD)
    failed = False
    with tempfile.TemporaryFile() as sink:
        try:
            with _python_stderr_to(real):
                os.dup2(sink.fileno(), STDERR_FD)
                try:
                    yield
                except BaseException:
                    failed = True
                    raise
                finally:
                    os.dup2(real, STDERR_FD)
        finally:
            os.close(real)
            sink.seek(0)
            _hold(sink.read(), show=failed)


def _hold(captured: bytes, show: bool) -> None:
    """Keep ``captured`` for :func:`set_verbose`, or write it out now if ``show`` (the block that
    printed it failed) or the process turned verbose meanwhile."""
    if captured:
        _state.held.append(captured)
    if show or verbose():
        while _state.held:
            _write_stderr(_state.held.pop(0))


def _write_stderr(data: bytes) -> None:
    """All of ``data`` to file descriptor 2."""
    view = memoryview(data)
    while view:
        view = view[os.write(STDERR_FD, view):]


def _flush_python_stderr() -> None:
    for stream in {id(s): s for s in (sys.stderr, sys.__stderr__) if s is not None}.values():
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or detached: nothing to flush
            pass


@contextmanager
def _python_stderr_to(fd: int) -> Iterator[None]:
    """While the block runs, ``sys.stderr`` and every logging handler writing to it write to a
    stream on ``fd`` (a copy of the real descriptor 2) instead."""
    old = sys.stderr
    encoding = getattr(old, "encoding", None) or "utf-8"
    # closed below by hand: closefd=False keeps ``fd`` itself, which native_stderr_held owns
    stream: TextIO = open(fd, "w", buffering=1, encoding=encoding, errors="backslashreplace",  # noqa: SIM115
                          closefd=False)
    handlers = [h for h in _stream_handlers() if h.stream is old or h.stream is sys.__stderr__]
    sys.stderr = stream
    for h in handlers:
        h.setStream(stream)
    try:
        yield
    finally:
        sys.stderr = old
        for h in handlers:
            h.setStream(old)
        stream.close()  # flushes


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class _HeldImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: the first import of each of ``names`` gets the real finders' spec
    with a loader that runs the module under :func:`native_stderr_held`; then it steps aside."""

    def __init__(self, names: Sequence[str]):
        self.names = set(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = _find_without(self, fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HeldLoader(spec.loader)
        return spec


def _find_without(finder: importlib.abc.MetaPathFinder, fullname: str) -> ModuleSpec | None:
    """``fullname``'s spec from the finders of ``sys.meta_path`` other than ``finder``."""
    present = finder in sys.meta_path
    if present:
        sys.meta_path.remove(finder)
    try:
        return importlib.util.find_spec(fullname)
    finally:
        if present:
            sys.meta_path.insert(0, finder)


class _HeldLoader(importlib.abc.Loader):
    """The real loader, its module run under :func:`native_stderr_held`; the module keeps the
    real loader as its ``__loader__``."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with native_stderr_held():
            self.loader.exec_module(module)
