"""`optuna-dashboard optuna/journal.log` (the README's command) shows the tuning study.

A study written through ``tune.open_study`` (the journal file tune.py uses), then a real
optuna-dashboard server on a free loopback port, asked for its studies over HTTP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from _servers import free_port, wait_until_up
from conftest import tiny_config
from srgan import tune

DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"
START_S = 60


def test_dashboard_serves_the_journal_study(tmp_path):
    if not DASHBOARD.exists() and shutil.which("optuna-dashboard") is None:
        pytest.skip("optuna-dashboard is not installed (`pip install -e .[test]` installs it)")
    journal = tmp_path / "journal.log"
    study = tune.open_study(tiny_config(), "srgan-perpix", str(journal), seed=1)
    for value in (27.1, 27.4, 26.9):  # three finished trials, as tune.py leaves them
        trial = study.ask()
        trial.suggest_float("loss.w_adv", 1e-5, 1e-2, log=True)
        study.tell(trial, value)

    port = free_port()
    exe = str(DASHBOARD if DASHBOARD.exists() else shutil.which("optuna-dashboard"))
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen([exe, str(journal), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/api/studies", log, START_S, "optuna-dashboard")
        with urllib.request.urlopen(url + "/api/studies", timeout=5) as r:
            studies = json.load(r)["study_summaries"]
        (found,) = [s for s in studies if s["study_name"] == "srgan-perpix"]
        with urllib.request.urlopen(f"{url}/api/studies/{found['study_id']}", timeout=5) as r:
            detail = json.load(r)
        assert len(detail["trials"]) == 3 and max(v for t in detail["trials"] for v in t["values"]) == 27.4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
