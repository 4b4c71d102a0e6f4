"""The rating app against a hostile-but-realistic rater: blinding side channels, identity
takeover, forged requests, out-of-turn ratings, pathological bodies, and the code structure a
review asked for. Real Flask test client, real sqlite."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import noise_valid_dir

from srgan.mos import app as mos_app
from srgan.mos import db, results, scale, stats
from srgan.mos import study as S
from srgan.mos.app import CSRF_HEADER, MAX_BODY_BYTES, create_app, order_for

METHODS = ("nearest", "bicubic", "gan", "hr")


def _gan(lr: np.ndarray, s: int) -> np.ndarray:
    return 255 - S.upscale_bicubic(lr, s)


@pytest.fixture()
def env(tmp_path):
    """6 images x 4 methods: enough images that a per-image method order cannot be chance."""
    st = S.prepare_study(noise_valid_dir(tmp_path / "valid", 6, seed=3), tmp_path / "study",
                         [S.ModelMethod("gan", _gan, "fake")], log=lambda s: None)
    dbp = tmp_path / "ratings.sqlite"
    return st, create_app(tmp_path / "study", dbp), dbp


def csrf(client) -> str:
    return client.get("/api/state").get_json()["csrf"]


def post(client, path: str, **kw):
    headers = {CSRF_HEADER: csrf(client), **kw.pop("headers", {})}
    return client.post(path, headers=headers, **kw)


def start(client, name: str = "ann"):
    return post(client, "/start", json={"name": name})


def n_ratings(dbp: Path) -> int:
    c = sqlite3.connect(dbp)
    try:
        return c.execute("SELECT count(*) FROM ratings").fetchone()[0]
    finally:
        c.close()


def by_image(st: S.Study) -> dict[str, dict[str, str]]:
    """image -> method -> stimulus id."""
    out: dict[str, dict[str, str]] = {}
    for sid, s in st.stimuli.items():
        out.setdefault(s.image, {})[s.method] = sid
    return out


# -- 1. blinding ---------------------------------------------------------------------------------


def test_no_response_header_orders_an_images_stimuli_by_method(env):
    # The leak: send_file's ETag held each file's mtime, and prepare wrote nearest, bicubic,
    # models, HR in that order, so sorting one page's ETags named every method. Here every
    # header of every stimulus response is sorted per image; none may give one method order for
    # all images, and none may tell the methods of an image apart by value (e.g. by size).
    st, app, _ = env
    c = app.test_client()
    c.get("/")  # a browser has the page (and its session cookie) before it loads images
    images = by_image(st)
    headers = {img: {m: c.get(f"/image/{sid}").headers for m, sid in ms.items()}
               for img, ms in images.items()}
    assert not any("Last-Modified" in h for per in headers.values() for h in per.values())
    names = {k for per in headers.values() for h in per.values() for k, _ in h.items()}
    assert "ETag" in names
    for name in names:
        orders = set()
        for img in images:
            values = {m: headers[img][m].get(name) for m in METHODS}
            if len(set(values.values())) == 1 or name == "Date":
                continue  # the same for every method (or the request's time): says nothing
            assert name == "ETag", f"{name} differs between the methods of {img}: {values}"
            orders.add(tuple(sorted(METHODS, key=lambda m: values[m])))
        assert len(orders) != 1, f"sorting {name} gives the method order {orders} on every image"


def test_stimuli_of_an_image_have_one_size_and_chunk_layout(env):
    st, app, _ = env
    c = app.test_client()
    for img, ms in by_image(st).items():
        bodies = {m: c.get(f"/image/{sid}").data for m, sid in ms.items()}
        assert len({len(b) for b in bodies.values()}) == 1, img
        layouts = set()
        for m, body in bodies.items():
            layouts.add(tuple(_chunks(body)))
            with Image.open(io.BytesIO(body)) as im:  # still a plain, lossless, decodable PNG
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
                np.testing.assert_array_equal(np.asarray(im), _pixels(st, ms[m]))
        assert len(layouts) == 1, (img, layouts)  # same chunk types and lengths for every method


def _chunks(png: bytes) -> list[tuple[bytes, int]]:
    out, i = [], 8
    while i < len(png):
        length = int.from_bytes(png[i : i + 4], "big")
        out.append((png[i + 4 : i + 8], length))
        i += 12 + length
    return out


def _pixels(st: S.Study, sid: str) -> np.ndarray:
    with Image.open(st.stimuli_dir / st.stimuli[sid].file) as im:
        return np.asarray(im.convert("RGB"))


def test_etag_is_a_content_hash_and_conditional_get_works(env):
    st, app, _ = env
    c = app.test_client()
    sid = next(iter(st.stimuli))
    path = st.stimuli_dir / st.stimuli[sid].file
    r = c.get(f"/image/{sid}")
    etag = r.headers["ETag"]
    assert etag == f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"'
    os.utime(path, ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789))  # a new mtime...
    assert c.get(f"/image/{sid}").headers["ETag"] == etag  # ...changes nothing a rater sees
    r = c.get(f"/image/{sid}", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.data == b""


def test_prepare_gives_every_stimulus_one_mtime(env):
    st, _, _ = env
    mtimes = {(st.stimuli_dir / s.file).stat().st_mtime_ns for s in st.stimuli.values()}
    assert len(mtimes) == 1


def test_app_refuses_a_study_whose_sizes_name_the_method(env, tmp_path):
    # A study written the old way (compressed PNGs) would leak through Content-Length.
    st, _, dbp = env
    sid = by_image(st)["im0"]["nearest"]
    Image.fromarray(_pixels(st, sid)).save(st.stimuli_dir / st.stimuli[sid].file, format="PNG")
    assert S.blinding_problems(st) == ["im0"]
    with pytest.raises(S.StudyError, match="differ in file size"):
        create_app(st.root, dbp)


# -- 2. identity ---------------------------------------------------------------------------------


def test_typing_a_name_never_gives_that_raters_progress(env):
    _, app, _ = env
    ann = app.test_client()
    r = start(ann, "ann")
    ann_id, code = r.get_json()["rater"], r.get_json()["resume_code"]
    for _ in range(2):
        nxt = ann.get("/api/state").get_json()["next"]
        assert post(ann, "/rate", json={"stimulus": nxt, "score": 4}).status_code == 200

    mallory = app.test_client()
    for typed in ("ann", "ANN", "  ann ", "ａｎｎ"):  # same name, other case, spaces, full-width (NFKC)
        r = start(mallory, typed)
        assert r.status_code == 409 and "already taken" in r.get_json()["error"], typed
        assert mallory.get_cookie("mos_rater") is None
    assert mallory.get("/api/state").get_json()["rater"] is None
    r = post(mallory, "/start", data={"name": "ann"})  # the HTML form: the start page, with the reason
    assert r.status_code == 409 and b"already taken" in r.data and b'id="stimulus"' not in r.data
    # Guessing a resume code does not work either; a wrong one is refused, not a new identity.
    for wrong in ("A" * 24, "not a code", code[:-1] + ("A" if code[-1] != "A" else "B")):
        assert post(mallory, "/start", json={"code": wrong}).status_code == 403
    # Ann is untouched, and a distinct new name is a distinct new rater.
    assert ann.get("/api/state").get_json()["rater"] == ann_id
    assert ann.get("/api/state").get_json()["rated"] == 2
    r = start(mallory, "mallory")
    assert r.status_code == 200 and r.get_json()["rater"] != ann_id and r.get_json()["rated"] == 0
    # Anonymous raters are each their own identity.
    a1, a2 = app.test_client(), app.test_client()
    assert start(a1, "").get_json()["rater"] != start(a2, "").get_json()["rater"]


def test_secret_token_is_the_identity_and_only_its_hash_is_stored(env):
    _, app, dbp = env
    c = app.test_client()
    r = start(c, "bob")
    token = c.get_cookie("mos_rater").value
    assert db.TOKEN.fullmatch(token) and r.get_json()["resume_code"].replace("-", "") == token
    typed = " " + r.get_json()["resume_code"].lower().replace("o", "0").replace("i", "1") + " "
    assert db.normalize_token(typed) == token  # as copied by eye: any case, spaces, 0 for O, 1 for I
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    wal = Path(f"{dbp}-wal")
    raw = dbp.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert token.encode() not in raw and hashlib.sha256(token.encode()).hexdigest().encode() in raw
    # The public rater id (in the API and the ratings) is not a credential.
    d = app.test_client()
    d.set_cookie("mos_rater", r.get_json()["rater"])
    assert d.get("/api/state").get_json()["rater"] is None


def test_a_database_from_before_tokens_is_migrated_without_a_takeover(tmp_path, env):
    # Old scheme: the cookie WAS the rater id, handed to anyone who typed the name.
    st, _, _ = env
    old = tmp_path / "old.sqlite"
    c = sqlite3.connect(old)
    c.executescript("""
        CREATE TABLE raters (id TEXT PRIMARY KEY, name TEXT UNIQUE, created_at TEXT NOT NULL);
        CREATE TABLE ratings (id INTEGER PRIMARY KEY AUTOINCREMENT, study_id TEXT NOT NULL,
            rater TEXT NOT NULL REFERENCES raters(id), stimulus TEXT NOT NULL, score INTEGER NOT NULL,
            created_at TEXT NOT NULL, UNIQUE (rater, stimulus));
    """)
    sid = next(iter(st.stimuli))
    c.execute("INSERT INTO raters VALUES ('" + "a" * 32 + "', 'ann', 'then')")
    c.execute("INSERT INTO ratings(study_id, rater, stimulus, score, created_at) VALUES (?, ?, ?, 3, 'then')",
              (st.study_id, "a" * 32, sid))
    c.commit()
    c.close()
    client = create_app(st.root, old).test_client()
    client.set_cookie("mos_rater", "a" * 32)  # the old cookie value
    assert client.get("/api/state").get_json()["rater"] is None
    assert start(client, "ann").status_code == 409
    assert db.load_ratings(old, st.study_id) == [("a" * 32, sid, 3)]


# -- 3. forged requests --------------------------------------------------------------------------


def test_cross_origin_and_tokenless_posts_are_refused(env):
    _, app, dbp = env
    c = app.test_client()
    assert start(c).status_code == 200
    sid = c.get("/api/state").get_json()["next"]
    body = {"stimulus": sid, "score": 5}
    token = csrf(c)
    forged = [
        ({"Origin": "http://evil.example", CSRF_HEADER: token}, "cross-site"),  # the reported fault
        ({"Origin": "null", CSRF_HEADER: token}, "cross-site"),  # sandboxed iframe / data: URL
        ({"Origin": "http://localhost.evil.example", CSRF_HEADER: token}, "cross-site"),
        ({"Referer": "http://evil.example/page", CSRF_HEADER: token}, "cross-site"),  # no Origin
        ({"Origin": "http://[evil", CSRF_HEADER: token}, "cross-site"),  # not even a URL
        ({"Origin": "http://localhost"}, "form token"),  # right origin, no token
        ({CSRF_HEADER: "0" * 64}, "form token"),  # wrong token
        ({CSRF_HEADER: csrf(app.test_client())}, "form token"),  # another browser's token
    ]
    for headers, why in forged:
        for kw in ({"json": body}, {"data": {**body, "csrf": headers.get(CSRF_HEADER, "")}}):
            h = {k: v for k, v in headers.items() if k != CSRF_HEADER or "json" in kw}
            r = c.post("/rate", headers=h, **kw)
            assert r.status_code == 403, (headers, kw)
            assert why in (r.get_json()["error"] if r.is_json else r.get_data(as_text=True))
    r = c.post("/rate", data={**body, "csrf": "\u00e9" * 64})  # non-ASCII token: a 403, not a 500
    assert r.status_code == 403
    for path in ("/start", "/forget"):
        assert c.post(path, json={"name": "x"}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.post(path, data={"name": "x"}).status_code == 403
    assert c.get_cookie("mos_rater") is not None  # the forged /forget did not sign the rater out
    assert n_ratings(dbp) == 0
    # The same request from this host, token in the form field (as the page sends it) or header.
    r = c.post("/rate", data={**body, "csrf": token}, headers={"Origin": "http://localhost",
                                                               "Referer": "http://localhost/"})
    assert r.status_code == 303 and n_ratings(dbp) == 1
    nxt = c.get("/api/state").get_json()["next"]
    r = c.post("/rate", json={"stimulus": nxt, "score": 2}, headers={CSRF_HEADER: token, "Origin": "http://localhost:80"})
    assert r.status_code == 200 and n_ratings(dbp) == 2


def test_pages_embed_the_token_and_it_survives_a_restart(env):
    st, app, dbp = env
    c = app.test_client()
    html = c.get("/").get_data(as_text=True)
    token = html.split('name="csrf" value="')[1].split('"')[0]
    assert token == csrf(c)
    r = c.post("/start", data={"name": "cat", "csrf": token})
    assert r.status_code == 303
    page = c.get("/").get_data(as_text=True)
    assert page.count('name="csrf"') == 2  # the rating form and "not you?"
    token = page.split('name="csrf" value="')[1].split('"')[0]
    restarted = create_app(st.root, dbp).test_client()
    for name in ("mos_session", "mos_rater"):
        restarted.set_cookie(name, c.get_cookie(name).value)
    sid = restarted.get("/api/state").get_json()["next"]
    assert restarted.post("/rate", data={"stimulus": sid, "score": "3", "csrf": token}).status_code == 303


# -- 4. only the next stimulus -------------------------------------------------------------------


def test_only_the_stimulus_handed_out_as_next_can_be_rated(env):
    st, app, dbp = env
    c = app.test_client()
    rater = start(c).get_json()["rater"]
    order = order_for(st, rater)
    for other in order[1:4]:
        r = post(c, "/rate", json={"stimulus": other, "score": 5})
        assert r.status_code == 409 and "not the image you were given" in r.get_json()["error"]
        r = post(c, "/rate", data={"stimulus": other, "score": "5"})
        assert r.status_code == 409 and b"not the image you were given" in r.data
    assert n_ratings(dbp) == 0
    assert post(c, "/rate", json={"stimulus": order[0], "score": 5}).status_code == 200
    assert post(c, "/rate", json={"stimulus": order[2], "score": 5}).status_code == 409
    assert post(c, "/rate", json={"stimulus": order[1], "score": 5}).get_json()["rated"] == 2


# -- 5. pathological bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rate", "/start", "/forget"])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(env, path):
    _, app, dbp = env
    c = app.test_client()
    start(c)
    depth = 7000
    body = '{"stimulus": ' + "[" * depth + "]" * depth + ', "score": 3}'
    assert 13_000 < len(body) < MAX_BODY_BYTES  # under the size cap: only the nesting is wrong
    r = c.post(path, data=body, content_type="application/json", headers={CSRF_HEADER: csrf(c)})
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]
    deep_object = '{"a":' * 2500 + "1" + "}" * 2500
    r = c.post(path, data=deep_object, content_type="application/json", headers={CSRF_HEADER: csrf(c)})
    assert r.status_code == 400
    # Brackets inside strings are text, not nesting.
    r = c.post("/rate", data='{"stimulus": "[[[[{{{{", "score": 3}', content_type="application/json",
               headers={CSRF_HEADER: csrf(c)})
    assert r.status_code == 400 and r.get_json()["error"] == "unknown stimulus id"
    assert n_ratings(dbp) == 0


def test_huge_bodies_are_413_and_store_nothing(env):
    _, app, dbp = env
    c = app.test_client()
    start(c)
    sid = c.get("/api/state").get_json()["next"]
    big = "x" * (4 * MAX_BODY_BYTES)
    for kw in ({"json": {"stimulus": sid, "score": 3, "pad": big}},
               {"data": {"stimulus": sid, "score": "3", "pad": big}}):
        r = post(c, "/rate", **kw)
        assert r.status_code == 413, kw.keys()
    assert n_ratings(dbp) == 0


def test_json_depth_scan():
    assert not mos_app.json_depth_exceeds('{"a": [1, 2], "b": "]]]]"}', 2)
    assert mos_app.json_depth_exceeds('{"a": [[1]]}', 2)
    assert not mos_app.json_depth_exceeds('{"a": "\\"[[[[\\""}', 1)  # escaped quotes stay in the string


# -- 6. structure --------------------------------------------------------------------------------


def test_views_are_module_level_and_read_the_app_config(env, tmp_path):
    st, app, _ = env
    views = {"index": mos_app.index, "start": mos_app.start, "forget": mos_app.forget, "rate": mos_app.rate,
             "image": mos_app.image, "api_state": mos_app.api_state}
    for name, view in views.items():
        assert app.view_functions[f"mos.{name}"] is view
    # Two apps in one process, two studies: each view answers from its own app's config.
    other = S.prepare_study(noise_valid_dir(tmp_path / "valid2", 1, seed=3), tmp_path / "study2", log=lambda s: None)
    app2 = create_app(other.root, tmp_path / "r2.sqlite")
    assert app.test_client().get("/api/state").get_json()["total"] == 24
    assert app2.test_client().get("/api/state").get_json()["total"] == 3
    assert app2.test_client().get(f"/image/{next(iter(st.stimuli))}").status_code == 404


def test_the_rating_scale_is_defined_once():
    assert mos_app.LABELS is results.LABELS is stats.LABELS is scale.LABELS
    assert list(scale.LABELS) == [1, 2, 3, 4, 5]


def test_reading_ratings_never_writes(env, tmp_path):
    st, app, dbp = env
    c = app.test_client()
    start(c)
    post(c, "/rate", json={"stimulus": c.get("/api/state").get_json()["next"], "score": 4})
    del c, app
    # A database of the old schema: reading must not add columns, tables or indexes.
    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)
    conn.executescript("""
        CREATE TABLE raters (id TEXT PRIMARY KEY, name TEXT UNIQUE, created_at TEXT NOT NULL);
        CREATE TABLE ratings (id INTEGER PRIMARY KEY, study_id TEXT, rater TEXT, stimulus TEXT,
                              score INTEGER, created_at TEXT);
        INSERT INTO ratings VALUES (1, 's', 'r', 'x', 2, 't');
    """)
    conn.close()
    def schema() -> list[tuple]:
        conn = sqlite3.connect(old)
        try:
            return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        finally:
            conn.close()

    before, before_schema = old.read_bytes(), schema()
    assert db.load_ratings(old, "s") == [("r", "x", 2)]
    assert old.read_bytes() == before and schema() == before_schema
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("old")) == ["old.sqlite"]
    # A read-only file can still be read (nothing needs write access).
    os.chmod(old, 0o444)
    try:
        assert db.load_ratings(old, "s") == [("r", "x", 2)]
    finally:
        os.chmod(old, 0o644)
    assert len(db.load_ratings(dbp, st.study_id)) == 1


def test_reading_ratings_gives_clear_errors(tmp_path):
    with pytest.raises(db.RatingsError, match="no ratings database"):
        db.load_ratings(tmp_path / "missing.sqlite", "s")
    assert not (tmp_path / "missing.sqlite").exists()  # and nothing was created
    (tmp_path / "params.yaml").write_text("seed: 42\n" * 200)
    with pytest.raises(db.RatingsError, match="not a sqlite"):
        db.load_ratings(tmp_path / "params.yaml", "s")
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE runs (id TEXT)")
    conn.close()
    with pytest.raises(db.RatingsError, match="not a ratings database"):
        db.load_ratings(other, "s")
    (tmp_path / "empty.sqlite").write_bytes(b"")
    assert db.load_ratings(tmp_path / "empty.sqlite", "s") == []  # a start aborted before the schema
    with pytest.raises(db.RatingsError, match="not a sqlite"):
        db.init(tmp_path / "params.yaml")
