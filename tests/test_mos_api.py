"""Rating API safety: only stimuli are servable, bad or repeated ratings change nothing,
several raters at once, ratings survive a killed server."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from conftest import noise_valid_dir

from srgan.mos import study as S
from srgan.mos.app import CSRF_HEADER, create_app, order_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def env(tmp_path):
    """A 3 images x 4 methods study (fake model, no TF), its app and its ratings DB."""
    fake = S.ModelMethod("gan", lambda lr, s: 255 - S.upscale_bicubic(lr, s), "fake")
    st = S.prepare_study(noise_valid_dir(tmp_path / "valid", 3, seed=1), tmp_path / "study", [fake], log=lambda s: None)
    dbp = tmp_path / "ratings.sqlite"
    app = create_app(tmp_path / "study", dbp)
    return st, app, dbp


def rows(dbp: Path) -> list[tuple]:
    c = sqlite3.connect(dbp)
    try:
        return c.execute("SELECT id, study_id, rater, stimulus, score, created_at FROM ratings ORDER BY id").fetchall()
    finally:
        c.close()


@pytest.fixture()
def server(env):
    """The app on a real threaded HTTP server on a free 127.0.0.1 port."""
    st, app, dbp = env
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", srv.server_port, st, dbp
    srv.shutdown()
    t.join(5)


def csrf(client) -> str:
    """The CSRF token the app gives this client (as the rating page would embed it)."""
    return client.get("/api/state").get_json()["csrf"]


def post(client, path: str, **kw):
    """POST as the app's own pages do: with the client's CSRF token."""
    headers = {CSRF_HEADER: csrf(client), **kw.pop("headers", {})}
    return client.post(path, headers=headers, **kw)


def next_of(client) -> str:
    return client.get("/api/state").get_json()["next"]


def _rater(client, name: str = "ann") -> str:
    r = post(client, "/start", json={"name": name})
    assert r.status_code == 200
    return r.get_json()["rater"]


def session(base: str, name: str) -> requests.Session:
    """A requests session that started as rater ``name`` and sends its CSRF token on every request."""
    s = requests.Session()
    s.headers[CSRF_HEADER] = s.get(f"{base}/api/state", timeout=10).json()["csrf"]
    r = s.post(f"{base}/start", json={"name": name}, timeout=10)
    assert r.status_code == 200, r.text
    s.headers[CSRF_HEADER] = r.json()["csrf"]  # the token is bound to the new rater cookie
    return s


TRAVERSALS = [
    "/image/../../etc/passwd",
    "/image/..%2f..%2fetc%2fpasswd",
    "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/image/%252e%252e%252fetc%252fpasswd",
    "/image/..%5c..%5cetc%5cpasswd",
    "/image/....//....//etc/passwd",
    "/image/%2fetc%2fpasswd",
    "/image/study.json",
    "/image/..%2fstudy.json",
    "/image/stimuli",
    "/static/../study.json",
    "/static/..%2f..%2f..%2fstudy.json",
    "/study.json",
    "/stimuli/",
]


def test_only_stimuli_are_served(env):
    st, app, _ = env
    c = app.test_client()
    sid = next(iter(st.stimuli))
    r = c.get(f"/image/{sid}")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert r.data == (st.stimuli_dir / f"{sid}.png").read_bytes()
    for path in TRAVERSALS:
        r = c.get(path)
        assert r.status_code == 404, path
        assert b"root:" not in r.data and b"stimuli" not in r.data


def test_traversal_over_raw_http(server):
    # http.client sends the path byte for byte (a browser or requests would collapse '..').
    _, port, _, _ = server
    for path in TRAVERSALS:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (400, 404), (path, resp.status)
        assert b"root:" not in body and b'"stimuli"' not in body


def test_tampered_study_cannot_escape(tmp_path, env):
    st, _, dbp = env
    meta = json.loads((st.root / "study.json").read_text())
    sid, first = next(iter(meta["stimuli"].items()))
    (tmp_path / "secret.png").write_bytes(b"secret")
    for bad in ("../../secret.png", str(tmp_path / "secret.png"), "../study.json"):
        meta["stimuli"][sid] = dict(first, file=bad)
        (st.root / "study.json").write_text(json.dumps(meta))
        c = create_app(st.root, dbp).test_client()
        r = c.get(f"/image/{sid}")
        assert r.status_code == 404 and b"secret" not in r.data, bad


def test_method_never_reaches_the_rater(env):
    st, app, _ = env
    c = app.test_client()
    _rater(c)
    html = c.get("/").get_data(as_text=True)
    for word in ("nearest", "bicubic", "gan", "hr.png", "im0", "im1", "im2"):
        assert word not in html


BAD_SCORES = [0, 6, -1, "0", "6", "x", "", " 3", "3\n", "3.0", "3.5", 3.5, 3.0, True, None, [3], {"v": 3}]


def test_bad_ratings_are_rejected_and_change_nothing(env):
    st, app, dbp = env
    c = app.test_client()
    sid = next(iter(st.stimuli))
    # No rater yet
    r = post(c, "/rate", json={"stimulus": sid, "score": 3})
    assert r.status_code == 400 and "no rater" in r.get_json()["error"]
    _rater(c)
    sid = next_of(c)  # the one stimulus this rater may rate: bad scores must fail for it too
    before = rows(dbp)
    for score in BAD_SCORES:
        r = post(c, "/rate", json={"stimulus": sid, "score": score})
        assert r.status_code == 400, score
        assert "score must be an integer from 1" in r.get_json()["error"]
    for score in ("0", "6", "x", "2.5", ""):  # the HTML form path: text message, same status
        r = post(c, "/rate", data={"stimulus": sid, "score": score})
        assert r.status_code == 400 and b"score must be an integer" in r.data
    for unknown in ("0000000000000000", "../../etc/passwd", sid.upper(), "", 12, None):
        r = post(c, "/rate", json={"stimulus": unknown, "score": 3})
        assert r.status_code == 400 and r.get_json()["error"] == "unknown stimulus id", unknown
    r = post(c, "/rate", data=b"not json", content_type="application/json")
    assert r.status_code == 400
    r = post(c, "/rate", json=[sid, 3])
    assert r.status_code == 400
    assert rows(dbp) == before == []


def test_duplicate_rating_is_409_and_keeps_the_first(env):
    _, app, dbp = env
    c = app.test_client()
    _rater(c)
    sid = next_of(c)
    r = post(c, "/rate", json={"stimulus": sid, "score": 2})
    assert r.status_code == 200 and r.get_json()["rated"] == 1
    before = rows(dbp)
    for score in (2, 5):
        r = post(c, "/rate", json={"stimulus": sid, "score": score})
        assert r.status_code == 409 and "already been rated" in r.get_json()["error"]
    r = post(c, "/rate", data={"stimulus": sid, "score": "5"})  # form: readable page, same 409
    assert r.status_code == 409 and b"already been rated" in r.data
    assert rows(dbp) == before and before[0][4] == 2


def test_order_is_per_rater_and_state_comes_from_db(env):
    st, app, dbp = env
    a, b = app.test_client(), app.test_client()
    ra, rb = _rater(a, "ann"), _rater(b, "bob")
    assert sorted(order_for(st, ra)) == sorted(st.stimuli)
    assert order_for(st, ra) != order_for(st, rb)
    assert order_for(st, ra) == order_for(st, ra)  # stable: same order after a restart
    seen = []
    for i in range(5):
        state = a.get("/api/state").get_json()
        assert state["rated"] == i and state["next"] == order_for(st, ra)[i]
        post(a, "/rate", json={"stimulus": state["next"], "score": 3})
        seen.append(state["next"])
    # A fresh app (a restarted server) with the same cookies continues, forms still valid.
    c = create_app(st.root, dbp).test_client()
    for cookie in ("mos_rater", "mos_session"):
        c.set_cookie(cookie, a.get_cookie(cookie).value)
    state = c.get("/api/state").get_json()
    assert state["rater"] == ra and state["rated"] == 5 and state["next"] not in seen
    # A new browser (no cookie) continues with the resume code shown on the rating page.
    html = a.get("/").get_data(as_text=True)
    code = html.split('id="resume-code">')[1].split("<")[0]
    e = create_app(st.root, dbp).test_client()
    r = post(e, "/start", json={"code": code.lower()})  # typed in any case
    assert r.status_code == 200 and r.get_json()["rater"] == ra and r.get_json()["rated"] == 5
    # A forged cookie is not a rater.
    d = app.test_client()
    d.set_cookie("mos_rater", "F" * 24)
    assert post(d, "/rate", json={"stimulus": state["next"], "score": 3}).status_code == 400


def test_two_raters_at_once(server):
    base, _, st, dbp = server
    ids = list(st.stimuli)

    def rate_all(name: str) -> list[int]:
        s = session(base, name)
        codes = []
        while True:
            state = s.get(f"{base}/api/state", timeout=10).json()
            if state["done"]:
                return codes
            codes.append(s.post(f"{base}/rate", json={"stimulus": state["next"], "score": 1 + len(codes) % 5},
                                timeout=10).status_code)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(rate_all, ["ann", "bob", "cyd", "dan"]))
    assert all(codes == [200] * len(ids) for codes in results)
    got = rows(dbp)
    assert len(got) == 4 * len(ids)
    by_rater: dict[str, set] = {}
    for _, study_id, rater, sid, _, _ in got:
        assert study_id == st.study_id
        by_rater.setdefault(rater, set()).add(sid)
    assert len(by_rater) == 4 and all(v == set(ids) for v in by_rater.values())


def test_same_rating_raced_is_stored_once(server):
    base, _, _, dbp = server
    s = session(base, "racer")
    sid = s.get(f"{base}/api/state", timeout=10).json()["next"]
    cookies, headers = s.cookies.get_dict(), dict(s.headers)

    def rate(score: int) -> int:
        return requests.post(f"{base}/rate", json={"stimulus": sid, "score": score}, cookies=cookies,
                             headers=headers, timeout=10).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(rate, [1, 2, 3, 4, 5, 1, 2, 3]))
    assert sorted(codes) == [200] + [409] * 7
    assert len(rows(dbp)) == 1


def test_one_name_raced_gives_one_rater(server):
    base, _, _, _ = server

    def claim(_: int) -> int:
        s = requests.Session()
        s.headers[CSRF_HEADER] = s.get(f"{base}/api/state", timeout=10).json()["csrf"]
        return s.post(f"{base}/start", json={"name": "sam"}, timeout=10).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(claim, range(8)))
    assert sorted(codes) == [200] + [409] * 7


def test_huge_chunked_body_over_http_is_refused(server):
    # No Content-Length to check up front: the server must still stop at the body cap.
    base, _, _, dbp = server
    s = session(base, "big")
    nxt = s.get(f"{base}/api/state", timeout=10).json()["next"]

    def body():
        yield f'{{"stimulus": "{nxt}", "score": 3, "pad": "'.encode()
        for _ in range(1024):
            yield b"x" * 1024
        yield b'"}'

    r = s.post(f"{base}/rate", data=body(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code in (400, 413) and "error" in r.json()
    assert rows(dbp) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ratings_survive_a_killed_server(env, tmp_path):
    st, _, _ = env
    dbp = tmp_path / "killed.sqlite"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "mos.py"), "serve", "--study", str(st.root), "--db", str(dbp),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                requests.get(base, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        s = session(base, "kim")
        for i in range(3):
            nxt = s.get(f"{base}/api/state", timeout=10).json()["next"]
            assert s.post(f"{base}/rate", json={"stimulus": nxt, "score": i + 1}, timeout=10).status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown handler runs
        proc.wait(10)
    assert [r[4] for r in rows(dbp)] == [1, 2, 3]


def test_re_preparing_while_serving_keeps_ratings_attributable_and_refuses_stale_stimuli(env, tmp_path, capsys):
    """GitHub issue 28 item 6: `mos.py prepare --force` with other models while the app served. The
    app went on handing out the old stimulus (its image now 404), stored a score for it (200), and
    the old stimulus -> method mapping was deleted: `mos.py results` showed n=0 for every method."""
    import mos  # src/mos.py

    st, app, dbp = env
    c = app.test_client()
    _rater(c)
    for score in (4, 2):
        assert post(c, "/rate", json={"stimulus": next_of(c), "score": score}).status_code == 200
    stale = next_of(c)  # on the rater's page when the study is replaced
    other = S.ModelMethod("gan2", lambda lr, s: S.upscale_bicubic(lr, s) // 2, "fake2")
    new = S.prepare_study(tmp_path / "valid", st.root, [other], force=True, log=lambda s: None)
    assert new.study_id != st.study_id and stale not in new.stimuli
    before = rows(dbp)

    r = post(c, "/rate", json={"stimulus": stale, "score": 5})
    assert r.status_code == 410 and "reload" in r.get_json()["error"], r.get_json()
    assert c.get(f"/image/{stale}").status_code == 410
    assert rows(dbp) == before  # nothing stored for it
    state = c.get("/api/state").get_json()  # the app serves the new version now
    assert state["next"] in new.stimuli and state["rated"] == 0 and state["total"] == len(new.stimuli)
    assert post(c, "/rate", json={"stimulus": state["next"], "score": 3}).status_code == 200
    assert rows(dbp)[-1][1] == new.study_id

    # the first version's ratings still say which method they rated
    out = tmp_path / "reports"
    mos.main(["results", "--study", str(st.root), "--db", str(dbp), "--out", str(out), "--no-mlflow"])
    printed = capsys.readouterr().out
    assert st.study_id in printed and "--version" in printed, printed  # where the other ratings are
    mos.main(["results", "--study", str(st.root), "--db", str(dbp), "--out", str(out), "--no-mlflow",
              "--version", st.study_id])
    res = json.loads((out / "mos.json").read_text())
    assert res["study_id"] == st.study_id and res["n_ratings"] == 2
    assert sum(m["n"] for m in res["methods"].values()) == 2 and "gan" in res["methods"]
