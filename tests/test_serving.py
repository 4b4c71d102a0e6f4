"""The registered champion generator served by a real `mlflow models serve` (GitHub issue 15 item 1).

A tiny generator is logged through srgan.tracking into a sqlite store, registered, promoted to
``champion`` and served from ``models:/<name>@champion`` with ``--env-manager local`` on a free
127.0.0.1 port. Request and answer are MLflow's tensor JSON:

    POST /invocations  Content-Type: application/json
    {"inputs": [[[[r, g, b], ...], ...]]}        N x H x W x 3 numbers in 0..255 (N equal-size images)
    -> 200 {"predictions": [[[[r, g, b], ...], ...]]}   N x (H*scale) x (W*scale) x 3 integers 0..255

8-bit levels travel as JSON integers both ways (lossless), so the served image must equal
``inference.upscale`` with the logged tile/overlap exactly: tolerance 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _servers import free_port, wait_until_up
from test_tracking import METRIC, OVERLAP, SCALE, TILE, log_tiny_generator, lr_image

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT = 120  # s: the server imports MLflow and TensorFlow and loads the model (~20 s idle)
MODEL_NAME = "srgan-served"


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_champion_served_over_http_equals_tiled_inference(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    from srgan import inference, models, tracking

    monkeypatch.setattr(sys, "path", list(sys.path))
    before_uri = mlflow.get_tracking_uri()
    try:
        run_a, _ = log_tiny_generator(tmp_path, "serve", 30.0, seed=1)
        run_b, path_b = log_tiny_generator(tmp_path, "serve", 31.5, seed=2)
        for run_id in (run_a, run_b):
            tracking.register_model(run_id, MODEL_NAME)
        assert tracking.promote("serve", METRIC, MODEL_NAME) == "2"
    finally:
        mlflow.set_tracking_uri(before_uri)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / "serve.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/ping", log_path, START_TIMEOUT, "mlflow models serve")

        lr = lr_image(20, 13, seed=7)  # 3 x 2 tiles of 8 px: the tiled path
        status, answer = _post(url + "/invocations", {"inputs": lr[None].tolist()})
        assert status == 200, answer
        sr = np.asarray(answer["predictions"])
        assert sr.shape == (1, 20 * SCALE, 13 * SCALE, 3)
        assert sr.min() >= 0 and sr.max() <= 255
        expected = inference.upscale(models.load_generator(path_b), lr, SCALE, tile=TILE, overlap=OVERLAP)
        np.testing.assert_array_equal(sr[0].astype(np.uint8), expected)  # tolerance 0

        status, answer = _post(url + "/invocations", {"inputs": [[[[300, 0, 0]]]]})  # not an 8-bit level
        assert status == 400 and "0, 255" in answer.get("stack_trace", "") + answer["message"], answer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)
