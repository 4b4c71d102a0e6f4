"""`mlflow ui` opens on what this project is: a real MLflow UI server and a real browser.

MLflow 3's UI shows an experiment in its GenAI mode (an empty "Traces" overview) unless the
experiment is tagged as model training; ``tracking.experiment_id`` tags it. Neither does the tag
alone (measured: the bare experiment URL still opens "Overview"); the link ``tracking.ui_path`` makes
(printed by the stages and `make ui`) must land on the runs table, with the Dataset column filled,
and the chart view must open.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from _servers import free_port, mlflow_server
from srgan import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RENDER_MS = 90_000  # the UI is a large React bundle: a loaded CI machine takes a while to draw it


def _runs(tmp_path: Path) -> tuple[str, list[str]]:
    """Two finished runs as the train stage leaves them: params, a curve, dataset inputs."""
    names = []
    for loss, psnr in (("hinge", 27.1), ("least_squares", 27.4)):
        run = tracking.start_run("srgan", run_name=f"srgan-{loss}", tags={"phase": "gan", "adv.loss": loss})
        run.log_params({"adv.loss": loss})
        for step in (1, 2, 3):
            run.log_metrics({"val_psnr_y": psnr + step / 10}, step=step)
        run.log_dataset("sample/train", "0123456789abcdef", tmp_path, "training")
        run.end()
        names.append(f"srgan-{loss}")
    return tracking.experiment_id("srgan"), names


@pytest.mark.slow
def test_mlflow_ui_lands_on_the_runs_table(tmp_path, monkeypatch):
    if CHROMIUM is None:
        pytest.skip("Chromium not found: `make sysdeps` installs it (root, Debian)")
    from playwright.sync_api import sync_playwright

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    exp_id, names = _runs(tmp_path)
    port = free_port()
    # what the README says to run: `mlflow ui` at the repository root (here: the store's folder)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{db}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with mlflow_server(tmp_path, cmd=cmd, port=port) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            try:
                pg.goto(f"{url}/{tracking.ui_path(exp_id)}")  # the link `make ui` prints
                for name in names:  # the runs table, not the traces overview
                    pg.get_by_text(name, exact=True).first.wait_for(timeout=RENDER_MS)
                assert f"/experiments/{exp_id}" in pg.url, pg.url
                pg.get_by_text("sample/train").first.wait_for(timeout=RENDER_MS)  # the Dataset column
                pg.screenshot(path=str(shots / "runs.png"), full_page=True)
                # the chart view of the same runs: one chart per metric
                pg.goto(f"{url}/#/experiments/{exp_id}/runs?{tracking.UI_QUERY}&compareRunsMode=CHART")
                pg.get_by_text("val_psnr_y").first.wait_for(timeout=RENDER_MS)
                pg.locator("svg.main-svg").first.wait_for(timeout=RENDER_MS)  # the curve is drawn (Plotly)
                pg.screenshot(path=str(shots / "charts.png"), full_page=True)
            finally:
                pg.screenshot(path=str(shots / "last.png"), full_page=True)  # what the page showed
        finally:
            browser.close()
    assert all((shots / f).stat().st_size > 10_000 for f in ("runs.png", "charts.png"))
