"""The one base class of the failures a user can fix, so the package raises its own errors and the
command line only prints them (the package never imports the CLI module).

Each module declares its own subclass (``tracking.TrackingStoreError``, ``export.ExportError``, ...);
``cli.run_main`` prints any of them as one ``error: <message>`` line and exits 1, no traceback.
"""

from __future__ import annotations


class ExpectedError(Exception):
    """An expected failure whose message is complete on one line: what is wrong and what to do."""
