"""The blind rating web app (Flask).

Routes (module-level views of the ``mos`` blueprint; the study and database come from
``current_app.config``)
    GET  /                 start page, the next stimulus to rate, or "done"
    POST /start            a name (form or JSON) -> a new rater; or a resume code -> that rater
    POST /forget           drop the rater cookie ("not you?")
    GET  /image/<id>       a stimulus PNG, looked up by id in the study: nothing else is servable
    POST /rate             the rater's next stimulus + score 1..5 (form -> 303 to /, JSON -> JSON)
    GET  /api/state        CSRF token, and the rater's progress and next stimulus id (JSON)

Who is rating: the server issues each new rater a secret token (cookie ``mos_rater``, shown on
the rating page as a resume code for another browser). A name is only a label: typing someone
else's name never gives their progress; a name in use is refused.

Forged requests: every POST must come from this host (Origin, else Referer, must match) and
carry the CSRF token (form field ``csrf`` or header ``X-CSRF-Token``), an HMAC of the browser's
session cookie and rater token under a key kept in the database, so it survives restarts.

All progress comes from the database (what this rater has rated), never from the session, so a
rater can close the tab and come back, and a restarted server picks up exactly where it stopped.
The order is a per-rater seeded shuffle of the study; only the stimulus the server hands out as
next can be rated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
)

from . import db
from .scale import LABELS, MAX_SCORE, MIN_SCORE
from .study import STIMULUS_ID, Study, StudyError, blinding_problems, load_study

bp = Blueprint("mos", __name__)

# app.config keys
STUDY_KEY, DB_KEY, SECRET_KEY = "MOS_STUDY", "MOS_DB", "MOS_SECRET"

RATER_COOKIE = "mos_rater"
SESSION_COOKIE = "mos_session"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16); used with fullmatch
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": "80", "https": "443"}

MAX_BODY_BYTES = 16 * 1024
# Every accepted body is one flat object; checked before json.loads, whose recursion a deeply
# nested 14 KB body would exhaust (RecursionError -> 500).
MAX_JSON_DEPTH = 2
MAX_NAME_CHARS = 64
SCORE_TEXT = re.compile(rf"[{MIN_SCORE}-{MAX_SCORE}]")  # fullmatch: "$" would also accept "3\n"
IMAGE_MAX_AGE_S = 3600
RESUME_GROUP = 4  # resume code shown as ABCD-EFGH-...: easier to copy by eye


def default_db(study_dir: Path) -> Path:
    """Ratings live beside the study (mos/ratings.sqlite): re-preparing a study never deletes them."""
    return Path(study_dir).resolve().parent / "ratings.sqlite"


def order_for(study: Study, rater: str) -> list[str]:
    """The rater's fixed random order: seeded by (study, rater id), so it survives restarts."""
    ids = sorted(study.stimuli)
    seed = int.from_bytes(hashlib.sha256(f"{study.study_id}:{rater}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(ids)
    return ids


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (a linear scan, no recursion)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def csrf_token(secret: bytes, session: str, rater_token: str) -> str:
    """The CSRF token of a (session, rater) pair: an HMAC, so a planted cookie cannot be matched."""
    return hmac.new(secret, f"{session}|{rater_token}".encode(), hashlib.sha256).hexdigest()


class StudyUnavailable(Exception):
    """The study folder is being replaced, or its new version cannot be served (503)."""


def _checked_study(study_dir: Path) -> Study:
    study = load_study(study_dir)
    leaky = blinding_problems(study)
    if leaky:
        raise StudyError(f"{study_dir}: the stimuli of {', '.join(leaky[:5])} differ in file size, which "
                         "tells raters the method; rebuild the study with `python src/mos.py prepare --force`")
    return study


class ServedStudy:
    """The study version the app serves: the one in ``study_dir`` now. `mos.py prepare --force`
    replaces the folder while the app runs; the next request sees the new study.json (a stat per
    request), records the new version in the ratings database and serves it. Stimuli of an earlier
    version are refused from then on (410), so every rating belongs to the version it was given in."""

    def __init__(self, study_dir: Path, db_path: Path):
        self.study_dir, self.db_path = Path(study_dir), Path(db_path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.study = self._register(_checked_study(self.study_dir))

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.study_dir / "study.json")
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _register(self, study: Study) -> Study:
        conn = db.connect(self.db_path)
        try:
            db.register_study(conn, study.study_id, study.meta)
        finally:
            conn.close()
        return study

    def current(self) -> Study:
        """The study to serve this request; StudyUnavailable while the folder is replaced."""
        try:
            stamp = self._stat()
        except FileNotFoundError:
            raise StudyUnavailable("the study is being replaced: reload the page in a moment") from None
        if stamp == self._stamp:
            return self.study
        with self._lock:
            if stamp != self._stamp:
                try:
                    study = _checked_study(self.study_dir)
                except StudyError as exc:  # half-written by hand, or leaky: serve nothing rather than it
                    raise StudyUnavailable(f"the study cannot be served: {exc}") from None
                self.study, self._stamp = self._register(study), stamp
        return self.study


def create_app(study_dir: Path, db_path: Path | None = None) -> Flask:
    """An app serving the study at ``study_dir`` (and the versions that replace it) and storing
    ratings in ``db_path``."""
    _checked_study(study_dir)  # a study that cannot be served is refused before the database is touched
    db_path = Path(db_path) if db_path else default_db(study_dir)
    db.init(db_path)
    conn = db.connect(db_path)
    try:
        secret = db.app_secret(conn)
    finally:
        conn.close()
    app = Flask(__name__)
    app.config.update({STUDY_KEY: ServedStudy(study_dir, db_path), DB_KEY: db_path, SECRET_KEY: secret,
                       "MAX_CONTENT_LENGTH": MAX_BODY_BYTES})
    app.register_blueprint(bp)
    return app


# -- request helpers -----------------------------------------------------------------------------


def _study() -> Study:
    """The study version this request works with (one per request, even if it is replaced meanwhile)."""
    if "mos_study" not in g:
        g.mos_study = current_app.config[STUDY_KEY].current()
    return g.mos_study


def _stale(stim_id: str) -> bool:
    """Whether ``stim_id`` belongs only to earlier versions of the study (re-prepared since)."""
    return bool(db.versions_with(_conn(), stim_id) - {_study().study_id})


STALE = ("this image belongs to an earlier version of this study, which was re-prepared since: "
         "reload the page to rate the current one")


def _conn() -> sqlite3.Connection:
    if "mos_db" not in g:
        g.mos_db = db.connect(current_app.config[DB_KEY])
    return g.mos_db


def _wants_json() -> bool:
    return request.is_json or request.accept_mimetypes.best == "application/json"


def _fail(status: int, message: str) -> tuple[Any, int]:
    if _wants_json():
        return jsonify(error=message), status
    return render_template("error.html", message=message, status=status), status


def _read_payload() -> Any:
    """The request's fields: a flat JSON object or the form; None for anything else."""
    if not request.is_json:
        return request.form
    try:
        text = request.get_data(cache=True).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _rater_token() -> str:
    """The rater cookie as sent ('' if none); not yet checked against the database."""
    return request.cookies.get(RATER_COOKIE, "")


def _current_rater() -> str | None:
    if "mos_rater" not in g:
        token = db.normalize_token(_rater_token())
        g.mos_rater = db.rater_for_token(_conn(), token) if token else None
    return g.mos_rater


def _csrf(rater_token: str | None = None) -> str:
    token = _rater_token() if rater_token is None else rater_token
    return csrf_token(current_app.config[SECRET_KEY], g.mos_session, token)


def _own_origin() -> str:
    host = request.host.lower()
    default = DEFAULT_PORTS.get(request.scheme)
    if default and host.endswith(f":{default}"):
        host = host[: -len(default) - 1]
    return f"{request.scheme}://{host}"


def _same_origin(url: str) -> bool:
    try:
        parts = urlsplit(url.strip().lower())
    except ValueError:  # e.g. "http://[evil": not a URL, so not ours
        return False
    host = parts.netloc
    default = DEFAULT_PORTS.get(parts.scheme)
    if default and host.endswith(f":{default}"):
        host = host[: -len(default) - 1]
    return f"{parts.scheme}://{host}" == _own_origin()


def _state(rater: str) -> dict[str, Any]:
    study = _study()
    done = db.rated(_conn(), study.study_id, rater)
    nxt = next((s for s in order_for(study, rater) if s not in done), None)
    # Count only this study's stimuli: a rating of a removed id must not inflate progress.
    n_done = len(done & study.stimuli.keys())
    return {"rated": n_done, "total": len(study.stimuli), "next": nxt, "done": nxt is None}


def _set_cookie(resp: Response, name: str, value: str) -> None:
    resp.set_cookie(name, value, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="Lax",
                    secure=request.is_secure)


def _resume_code(token: str) -> str:
    return "-".join(token[i : i + RESUME_GROUP] for i in range(0, len(token), RESUME_GROUP))


def _clean_name(raw: str) -> str | None:
    """NFKC, whitespace collapsed ("Ann " is "Ann"); None if it holds control or format characters."""
    name = " ".join(unicodedata.normalize("NFKC", raw).split())
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        return None
    return name


# -- hooks ---------------------------------------------------------------------------------------


@bp.before_app_request
def _open_session() -> None:
    sid = request.cookies.get(SESSION_COOKIE, "")
    g.mos_new_session = not SESSION_ID.fullmatch(sid)
    g.mos_session = secrets.token_urlsafe(16) if g.mos_new_session else sid


@bp.before_request
def _guard_unsafe() -> Any:
    """Refuse cross-site and token-less writes before any view runs; parse the body once."""
    if request.method not in UNSAFE_METHODS:
        return None
    # Browsers send Origin on every POST (older ones at least Referer); a mismatch is another
    # site's page. A request with neither is not a browser's, so it rides no victim's cookies,
    # and it still needs the token below.
    origin, referer = request.headers.get("Origin"), request.headers.get("Referer")
    claimed = origin if origin is not None else referer
    if claimed is not None and not _same_origin(claimed):
        return _fail(403, "cross-site request refused: rate from this site's own pages")
    g.mos_payload = _read_payload()
    if g.mos_payload is None:
        return _fail(400, "expected a JSON object or a form")
    given = request.headers.get(CSRF_HEADER) or g.mos_payload.get(CSRF_FIELD)
    # Compared as bytes: compare_digest refuses non-ASCII str, and a form field can hold anything.
    if g.mos_new_session or not isinstance(given, str) or not hmac.compare_digest(given.encode(),
                                                                                   _csrf().encode()):
        return _fail(403, "missing or expired form token: reload the page and try again")
    return None


@bp.after_app_request
def _headers(resp: Response) -> Response:
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self'; frame-ancestors 'none'"
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" on a form
    # POST, and the origin check above could not tell our own pages from anyone's.
    resp.headers["Referrer-Policy"] = "same-origin"
    if resp.mimetype != "image/png":
        # A page from the back button would offer a stimulus that is already rated.
        resp.headers["Cache-Control"] = "no-store"
    if g.get("mos_new_session"):
        _set_cookie(resp, SESSION_COOKIE, g.mos_session)
    return resp


@bp.teardown_app_request
def _close(_exc: BaseException | None) -> None:
    c = g.pop("mos_db", None)
    if c is not None:
        c.close()


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": _csrf, "csrf_field": CSRF_FIELD, "labels": list(LABELS.items())}


@bp.app_errorhandler(400)
def _bad_request(_e: Exception) -> Any:
    return _fail(400, "bad request")


@bp.app_errorhandler(404)
def _not_found(_e: Exception) -> Any:
    return _fail(404, "not found")


@bp.app_errorhandler(413)
def _too_large(_e: Exception) -> Any:
    return _fail(413, "request too large")


@bp.app_errorhandler(410)
def _gone(_e: Exception) -> Any:
    return _fail(410, STALE)


@bp.app_errorhandler(StudyUnavailable)
def _unavailable(e: StudyUnavailable) -> Any:
    return _fail(503, str(e))


# -- views ---------------------------------------------------------------------------------------


@bp.get("/")
def index() -> Any:
    """The start page, the rater's next stimulus, or the thank-you page."""
    study = _study()
    rater = _current_rater()
    if rater is None:
        return render_template("start.html", total=len(study.stimuli))
    st = _state(rater)
    name = db.rater_name(_conn(), rater)
    if st["done"]:
        return render_template("done.html", name=name, **st)
    return render_template("rate.html", name=name, stim=study.stimuli[st["next"]],
                           resume_code=_resume_code(db.normalize_token(_rater_token()) or ""),
                           percent=round(100 * st["rated"] / st["total"]), **st)


def _start_refused(status: int, message: str) -> Any:
    if _wants_json():
        return jsonify(error=message), status
    return render_template("start.html", total=len(_study().stimuli), error=message), status


@bp.post("/start")
def start() -> Any:
    """A new rater (optional name), or, with ``code``, the rater that resume code belongs to."""
    data = g.mos_payload
    code = data.get("code", "")
    if code:
        token = db.normalize_token(code) if isinstance(code, str) else None
        rater = db.rater_for_token(_conn(), token) if token else None
        if token is None or rater is None:
            return _start_refused(403, "unknown resume code")
    else:
        raw = data.get("name", "")
        if not isinstance(raw, str):
            return _start_refused(400, "name must be text")
        name = _clean_name(raw)
        if name is None:
            return _start_refused(400, "name must not contain control characters")
        if len(name) > MAX_NAME_CHARS:
            return _start_refused(400, f"name is too long (at most {MAX_NAME_CHARS} characters)")
        try:
            rater, token = db.create_rater(_conn(), name or None)
        except db.NameTaken:
            return _start_refused(409, f"the name {name!r} is already taken: choose another one, or, to continue "
                                       "as that rater, enter the resume code shown on their rating page")
    if _wants_json():
        resp = jsonify(rater=rater, csrf=_csrf(token), resume_code=_resume_code(token), **_state(rater))
    else:
        resp = redirect("/", 303)
    _set_cookie(resp, RATER_COOKIE, token)
    return resp


@bp.post("/forget")
def forget() -> Any:
    """Drop the rater cookie: the next person at this browser starts as a new rater."""
    resp = jsonify(ok=True) if _wants_json() else redirect("/", 303)
    resp.delete_cookie(RATER_COOKIE)
    return resp


@bp.get("/image/<stim_id>")
def image(stim_id: str) -> Any:
    """A stimulus PNG, by id only, with no header that differs by method except a content hash."""
    path = _study().servable_file(stim_id)
    if path is None:
        abort(410 if STIMULUS_ID.match(stim_id) and _stale(stim_id) else 404)
    data = path.read_bytes()
    resp = Response(data, mimetype="image/png")
    # No Last-Modified, no mtime-based ETag: a timestamp would order an image's stimuli by method.
    resp.set_etag(hashlib.sha256(data).hexdigest())
    resp.cache_control.private = True
    resp.cache_control.max_age = IMAGE_MAX_AGE_S
    return resp.make_conditional(request)


def _valid_score(score: Any) -> bool:
    # Integers only: JSON 3 or text "3"; not 3.0, "3.5", true, "x", 0 or 6.
    if isinstance(score, bool):
        return False
    if isinstance(score, int):
        return MIN_SCORE <= score <= MAX_SCORE
    return isinstance(score, str) and SCORE_TEXT.fullmatch(score) is not None


@bp.post("/rate")
def rate() -> Any:
    """Store one score for the rater's next stimulus (and no other)."""
    study = _study()
    rater = _current_rater()
    if rater is None:
        return _fail(400, "no rater: open the start page and start rating first")
    data = g.mos_payload
    stim_id, score = data.get("stimulus"), data.get("score")
    if isinstance(stim_id, str) and stim_id not in study.stimuli and _stale(stim_id):
        return _fail(410, STALE)
    if not isinstance(stim_id, str) or stim_id not in study.stimuli:
        return _fail(400, "unknown stimulus id")
    if not _valid_score(score):
        return _fail(400, f"score must be an integer from {MIN_SCORE} (bad) to {MAX_SCORE} (excellent), "
                          f"got {score!r}")
    conn = _conn()
    try:
        # One write transaction: "is it this rater's next?" stays true until the insert commits.
        with db.write_transaction(conn):
            if stim_id in db.rated(conn, study.study_id, rater):
                raise db.DuplicateRating(stim_id)
            if stim_id != _state(rater)["next"]:
                return _fail(409, "this is not the image you were given to rate next: reload the page")
            db.add_rating(conn, study.study_id, rater, stim_id, int(score))
    except db.DuplicateRating:
        return _fail(409, "this image has already been rated by you; ratings cannot be changed")
    if _wants_json():
        return jsonify(ok=True, **_state(rater))
    return redirect("/", 303)


@bp.get("/api/state")
def api_state() -> Any:
    """The CSRF token for JSON clients, and the rater's progress (``rater`` is null before /start)."""
    rater = _current_rater()
    if rater is None:
        return jsonify(rater=None, csrf=_csrf(), total=len(_study().stimuli))
    return jsonify(rater=rater, csrf=_csrf(), **_state(rater))


def serve(study_dir: Path, db_path: Path | None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on a threaded werkzeug server (several raters at once)."""
    from werkzeug.serving import run_simple

    app = create_app(study_dir, db_path)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach it can rate (no authentication)")
    st: Study = app.config[STUDY_KEY].study
    print(f"study {st.study_id}: {len(st.stimuli)} stimuli; ratings in {app.config[DB_KEY]}")
    print(f"raters open http://{host}:{port}/")
    run_simple(host, port, app, threaded=True)
