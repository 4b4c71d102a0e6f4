"""The blind rating web app (Flask).

Routes
    GET  /                 start page (name) or the next stimulus to rate, or "done"
    POST /start            name (form or JSON) -> rater cookie
    POST /forget           drop the rater cookie ("not you?")
    GET  /image/<id>       a stimulus PNG, looked up by id in the study: nothing else is servable
    POST /rate             stimulus + score 1..5 (form -> 303 to /, JSON -> JSON)
    GET  /api/state        the rater's progress and next stimulus id (JSON)

All progress comes from the database (what this rater has rated), never from the session, so a
rater can close the tab, come back later or from another browser (same name), and a restarted
server picks up exactly where it stopped. The order is a per-rater seeded shuffle of the study.
"""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, send_file

from . import db
from .study import Study, load_study

COOKIE = "mos_rater"
RATER_ID = re.compile(r"^[0-9a-f]{32}$")
SCORE = re.compile(r"^[1-5]$")
LABELS = [(1, "Bad"), (2, "Poor"), (3, "Fair"), (4, "Good"), (5, "Excellent")]


def default_db(study_dir: Path) -> Path:
    """Ratings live beside the study (mos/ratings.sqlite): re-preparing a study never deletes them."""
    return Path(study_dir).resolve().parent / "ratings.sqlite"


def order_for(study: Study, rater: str) -> list[str]:
    """The rater's fixed random order: seeded by (study, rater), so it survives restarts."""
    ids = sorted(study.stimuli)
    seed = int.from_bytes(hashlib.sha256(f"{study.study_id}:{rater}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(ids)
    return ids


def create_app(study_dir: Path, db_path: Path | None = None) -> Flask:
    """An app serving the study at ``study_dir`` and storing ratings in ``db_path``."""
    study = load_study(study_dir)
    db_path = Path(db_path) if db_path else default_db(study_dir)
    db.init(db_path)
    stim_root = study.stimuli_dir.resolve()

    app = Flask(__name__)
    app.config.update(MOS_STUDY=study, MOS_DB=db_path, MAX_CONTENT_LENGTH=16 * 1024)

    def conn() -> sqlite3.Connection:
        if "mos_db" not in g:
            g.mos_db = db.connect(db_path)
        return g.mos_db

    @app.teardown_appcontext
    def _close(_exc: BaseException | None) -> None:
        c = g.pop("mos_db", None)
        if c is not None:
            c.close()

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self'; frame-ancestors 'none'"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if resp.mimetype != "image/png":
            # A page from the back button would offer a stimulus that is already rated.
            resp.headers["Cache-Control"] = "no-store"
        return resp

    def wants_json() -> bool:
        return request.is_json or request.accept_mimetypes.best == "application/json"

    def fail(status: int, message: str) -> tuple[Any, int]:
        if wants_json():
            return jsonify(error=message), status
        return render_template("error.html", message=message, status=status), status

    def payload() -> Any:
        """The request's fields: a JSON object or the form; None for anything else."""
        if request.is_json:
            data = request.get_json(silent=True)
            return data if isinstance(data, dict) else None
        return request.form

    def current_rater() -> str | None:
        rid = request.cookies.get(COOKIE, "")
        return rid if RATER_ID.match(rid) and db.rater_exists(conn(), rid) else None

    def state(rater: str) -> dict[str, Any]:
        done = db.rated(conn(), study.study_id, rater)
        nxt = next((s for s in order_for(study, rater) if s not in done), None)
        # Count only this study's stimuli: a rating of a removed id must not inflate progress.
        n_done = len(done & study.stimuli.keys())
        return {"rated": n_done, "total": len(study.stimuli), "next": nxt, "done": nxt is None}

    @app.get("/")
    def index() -> Any:
        rater = current_rater()
        if rater is None:
            return render_template("start.html", total=len(study.stimuli))
        st = state(rater)
        name = db.rater_name(conn(), rater)
        if st["done"]:
            return render_template("done.html", name=name, **st)
        stim = study.stimuli[st["next"]]
        return render_template("rate.html", name=name, stim=stim, labels=LABELS,
                               percent=round(100 * st["rated"] / st["total"]), **st)

    @app.post("/start")
    def start() -> Any:
        data = payload()
        raw = data.get("name", "") if data is not None else None
        if not isinstance(raw, str):
            return fail(400, "name must be text")
        name = " ".join(raw.split())  # collapse whitespace so "Ann " and "Ann" are one rater
        if len(name) > 64:
            return fail(400, "name is too long (at most 64 characters)")
        rater = db.rater_for_name(conn(), name or None)
        resp = jsonify(rater=rater, **state(rater)) if wants_json() else redirect("/", 303)
        resp.set_cookie(COOKIE, rater, max_age=365 * 24 * 3600, httponly=True, samesite="Lax")
        return resp

    @app.post("/forget")
    def forget() -> Any:
        resp = redirect("/", 303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/image/<stim_id>")
    def image(stim_id: str) -> Any:
        stim = study.stimuli.get(stim_id)
        if stim is None:
            abort(404)
        path = (study.stimuli_dir / stim.file).resolve()
        # Defence in depth: even a tampered study.json cannot point outside stimuli/.
        if not path.is_relative_to(stim_root) or path.suffix != ".png" or not path.is_file():
            abort(404)
        return send_file(path, mimetype="image/png", max_age=3600, conditional=True, etag=True)

    @app.post("/rate")
    def rate() -> Any:
        rater = current_rater()
        if rater is None:
            return fail(400, "no rater: open the start page and enter a name first")
        data = payload()
        if data is None:
            return fail(400, "expected a JSON object or a form with 'stimulus' and 'score'")
        stim_id, score = data.get("stimulus"), data.get("score")
        if not isinstance(stim_id, str) or stim_id not in study.stimuli:
            return fail(400, "unknown stimulus id")
        # Integers 1..5 only: JSON 3 or text "3"; not 3.0, "3.5", true, "x", 0 or 6.
        if isinstance(score, bool) or not (
            (isinstance(score, int) and 1 <= score <= 5) or (isinstance(score, str) and SCORE.match(score))
        ):
            return fail(400, f"score must be an integer from 1 (bad) to 5 (excellent), got {score!r}")
        try:
            db.add_rating(conn(), study.study_id, rater, stim_id, int(score))
        except db.DuplicateRating:
            return fail(409, "this image has already been rated by you; ratings cannot be changed")
        if wants_json():
            return jsonify(ok=True, **state(rater))
        return redirect("/", 303)

    @app.get("/api/state")
    def api_state() -> Any:
        rater = current_rater()
        if rater is None:
            return jsonify(error="no rater"), 400
        return jsonify(rater=rater, **state(rater))

    @app.errorhandler(404)
    def _not_found(_e: Exception) -> Any:
        return fail(404, "not found")

    @app.errorhandler(413)
    def _too_large(_e: Exception) -> Any:
        return fail(413, "request too large")

    return app


def serve(study_dir: Path, db_path: Path | None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on a threaded werkzeug server (several raters at once)."""
    from werkzeug.serving import run_simple

    app = create_app(study_dir, db_path)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach it can rate (no authentication)")
    st: Study = app.config["MOS_STUDY"]
    print(f"study {st.study_id}: {len(st.stimuli)} stimuli; ratings in {app.config['MOS_DB']}")
    print(f"raters open http://{host}:{port}/")
    run_simple(host, port, app, threaded=True)
