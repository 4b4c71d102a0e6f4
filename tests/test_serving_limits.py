"""The served generator under hostile but realistic requests (GitHub issue 28 item 1), on a real
`mlflow models serve` of a registered model on 127.0.0.1.

Before: one POST of a 4000x4000 image grew the server to 7.4 GB, the client got a 504 after 60 s and
the server went on computing until it was SIGKILLed; the project's own message reached the client
only inside ``stack_trace`` (with server paths), a wrong-shape error echoed the input, 100,000-deep
JSON was a 500 and [0, 1] floats gave a near-black image without a word.

The server here runs with a small limit and small tiles (``SERVING_MODEL_CONFIG``, MLflow's way to
override a model's config when serving) and a short request timeout (``-t``), so each fault costs
seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _servers import _stop_group, free_port, wait_until_up
from test_tracking import OVERLAP, SCALE, TILE, log_tiny_generator

from srgan import limits

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT = 180  # s: the server imports MLflow and TensorFlow and loads the model
MODEL_NAME = "srgan-bounded"
LIMIT = 256 * 256  # the served max_pixels here (the default is limits.SERVE_MAX_PIXELS)
REQUEST_TIMEOUT_S = 4  # mlflow models serve -t: the server's 504 and the model's deadline
SERVED_TILE = 4  # many small tiles: the model's own work on an image outlasts the timeout
ABANDONED_SIDE = 256  # within LIMIT: 4,096 tiles, ~10 s of the model's work, over REQUEST_TIMEOUT_S
MB = 1e6


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict | str, float]:
    """(status, JSON answer or text, seconds) of a POST to /invocations."""
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        answer: dict | str = json.loads(raw)
    except ValueError:
        answer = raw.decode(errors="replace")
    return status, answer, time.time() - t0


def _images(side: int, n: int = 1, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)).tolist()


def _body(inputs, **params) -> bytes:
    return json.dumps({"inputs": inputs, **({"params": params} if params else {})}).encode()


def _worker_pid(leader: int) -> int:
    """The uvicorn process of `mlflow models serve` (the CLI's child), which loads the model."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == leader and b"uvicorn" in cmd:
                return int(entry.name)
    raise LookupError(f"no uvicorn child of {leader}")


def _status(pid: int, key: str) -> int:
    """A /proc/<pid>/status value in kB (VmHWM: the peak resident memory so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """(url, uvicorn pid) of a registered tiny generator served by `mlflow models serve`."""
    import mlflow

    from srgan import tracking

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI",)}
    before_uri, before_path = mlflow.get_tracking_uri(), list(sys.path)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_id, _ = log_tiny_generator(root, "bounded", 30.0, seed=3)
        tracking.register_model(run_id, MODEL_NAME)
        tracking.set_champion(MODEL_NAME, 1)
    finally:
        mlflow.set_tracking_uri(before_uri)
        sys.path[:] = before_path
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "SERVING_MODEL_CONFIG": json.dumps({"max_pixels": LIMIT, "tile": SERVED_TILE, "overlap": SERVED_TILE // 2}),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = root / "serve.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
           "-t", str(REQUEST_TIMEOUT_S)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: uvicorn outlives a plain kill
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/ping", log_path, START_TIMEOUT, "mlflow models serve")
        yield url, _worker_pid(proc.pid)
    finally:
        _stop_group(proc)


def _clean(answer: dict | str) -> dict:
    """The answer is MLflow's error JSON whose message is the whole story: no traceback, no paths."""
    assert isinstance(answer, dict), answer
    text = json.dumps(answer)
    assert "stack_trace" not in answer and "Traceback" not in text and "/site-packages/" not in text, answer
    return answer


@pytest.mark.slow
def test_over_the_limit_is_refused_at_once_naming_it(served):
    url, _ = served
    status, answer, took = _post(url, _body(_images(300)))  # 90,000 px > 65,536: parsed, then refused
    msg = _clean(answer)["message"]
    assert status == 400 and took < REQUEST_TIMEOUT_S, (status, answer, took)
    assert f"{LIMIT:,}" in msg and "max_pixels" in msg and "300x300" in msg, msg
    # a body that cannot hold an allowed image is refused before MLflow parses it
    status, answer, took = _post(url, _body(_images(1024)))
    msg = _clean(answer)["message"]
    assert status == 413 and took < REQUEST_TIMEOUT_S and f"{LIMIT:,}" in msg, (status, msg, took)
    # a request may lower the limit for itself, never raise it
    status, answer, _ = _post(url, _body(_images(64), max_pixels=1000))
    assert status == 400 and "1,000" in _clean(answer)["message"], answer
    status, answer, _ = _post(url, _body(_images(300), max_pixels=10 * LIMIT))  # capped at the server's
    assert status == 400 and f"{LIMIT:,}" in _clean(answer)["message"], answer
    # the signature states the limit as the param's default
    status, answer, _ = _post(url, _body(_images(16)))
    assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 16 * SCALE, 16 * SCALE, 3)


@pytest.mark.slow
def test_memory_stays_bounded_under_several_refused_requests(served):
    url, pid = served
    before = _status(pid, "VmHWM")
    bodies = [_body(_images(300, seed=i)) for i in range(3)] + [_body(_images(1024, seed=i)) for i in range(3)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: _post(url, b), bodies))
    assert [s for s, _, _ in results] == [400] * 3 + [413] * 3, [(s, a) for s, a, _ in results]
    grown_mb = (_status(pid, "VmHWM") - before) * 1e3 / MB
    # accepted, the three 1024 x 1024 requests alone would hold 3 x 16.8 M output pixels as JSON
    # lists (~2 KB each, ~100 GB); refused, only the three small bodies are ever parsed
    assert grown_mb < 400, grown_mb


@pytest.mark.slow
def test_a_request_the_server_gave_up_on_stops_costing(served):
    url, pid = served
    status, _, took = _post(url, _body(_images(ABANDONED_SIDE)))
    assert status == 504 and took < REQUEST_TIMEOUT_S + 5, (status, took)
    per_second = []  # the worker's CPU seconds in each second after the 504
    for _ in range(6):
        cpu = _cpu_seconds(pid)
        time.sleep(1)
        per_second.append(round(_cpu_seconds(pid) - cpu, 2))
    # the first seconds: the tile in flight and the model's deadline (it starts after the JSON parse)
    assert sum(per_second[3:]) < 0.5, f"the server is still computing the abandoned request: {per_second}"
    status, answer, _ = _post(url, _body(_images(16)))  # and it still answers
    assert status == 200, answer


@pytest.mark.slow
def test_bad_requests_are_4xx_with_the_projects_message_and_no_echo(served):
    url, _ = served
    marker = 123.25  # a value that would show up in an echo of the input
    wrong = np.full((1, 40, 40, 2), marker).tolist()  # two channels
    status, answer, _ = _post(url, _body(wrong))
    msg = _clean(answer)["message"]
    assert status == 400 and "(1, 40, 40, 2)" in msg and "123.2" not in msg and len(msg) < 500, msg

    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer, _ = _post(url, deep)
    assert status == 400 and "nest" in _clean(answer)["message"], answer

    status, answer, _ = _post(url, _body([[[[0.5, 0.2, 0.9], [0.1, 0.0, 1.0]]]]))  # a [0, 1] float image
    msg = _clean(answer)["message"]
    assert status == 400 and "[0, 1]" in msg and "255" in msg, msg

    status, answer, _ = _post(url, _body([[[[300, 0, 0]]]]))  # the project's range message, as the message
    msg = _clean(answer)["message"]
    assert status == 400 and "[0, 255]" in msg, msg

    status, answer, _ = _post(url, b'{"inputs": [[[[1, 2, 3]]], "not-json-marker')
    msg = _clean(answer)["message"]
    assert status == 400 and "not-json-marker" not in msg and "JSON" in msg, msg


def test_limits_default_is_stated_in_the_signature(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.setattr(sys, "path", list(sys.path))
    before = mlflow.get_tracking_uri()
    try:
        run_id, _ = log_tiny_generator(tmp_path, "sig", 1.0)
        info = mlflow.models.get_model_info(f"runs:/{run_id}/mlflow_model")
    finally:
        mlflow.set_tracking_uri(before)
    (param,) = info.signature.params.params
    assert (param.name, param.default) == ("max_pixels", limits.SERVE_MAX_PIXELS)
    assert info.flavors["python_function"]["config"]["max_pixels"] == limits.SERVE_MAX_PIXELS
    assert (TILE, OVERLAP) == (8, 4)  # the tiles the timings above assume
