"""The rating app in a real headless browser (Playwright + the system's Chromium).

Set MOS_SCREENSHOT=docs/mos-screenshot.png to also save the rating page screenshot there.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from werkzeug.serving import make_server

from srgan.mos import study as S
from srgan.mos.app import create_app

CHROMIUM = os.environ.get("MOS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found: `apt-get install chromium` (make sysdeps) or set MOS_CHROMIUM=/path/to/chrome",
)


def _photos(root: Path) -> Path:
    """Three real photos (scikit-image samples, offline) as HR, their bicubic x4 as LR."""
    import skimage.data as data

    for d in ("hr", "lr"):
        (root / d).mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee"):
        img = getattr(data, name)()[..., :3]
        h, w = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
        Image.fromarray(img[:h, :w]).save(root / "hr" / f"{name}.png")
        Image.fromarray(img[:h, :w]).resize((w // 4, h // 4), Image.Resampling.BICUBIC).save(root / "lr" / f"{name}.png")
    return root


def _sharpened(lr: np.ndarray, scale: int) -> np.ndarray:
    """The test's 'model': bicubic plus an unsharp mask (so no TensorFlow is needed)."""
    up = Image.fromarray(S.upscale_bicubic(lr, scale))
    return np.asarray(up.filter(ImageFilter.UnsharpMask(radius=2, percent=160, threshold=2)))


@pytest.fixture()
def site(tmp_path):
    st = S.prepare_study(_photos(tmp_path / "valid"), tmp_path / "study",
                         [S.ModelMethod("sharp", _sharpened, "test")], crop=256, log=lambda s: None)
    dbp = tmp_path / "ratings.sqlite"
    srv = make_server("127.0.0.1", 0, create_app(tmp_path / "study", dbp), threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", st, dbp
    srv.shutdown()
    t.join(5)


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _current(page) -> str:
    src = page.get_attribute("#stimulus", "src")
    m = re.fullmatch(r"/image/([0-9a-f]{16})", src or "")
    assert m, src
    return m.group(1)


def _start(browser, base: str, name: str | None = None):
    """A new browser context on the start page; with ``name`` (else an anonymous rater), Start clicked."""
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(base)
    if name is not None:
        page.fill("#name", name)
    with page.expect_navigation():
        page.click("#start")
    return ctx, page


def _progress(page) -> str:
    return page.inner_text("#progress").strip()


def _db(dbp: Path, sql: str, *args) -> list[tuple]:
    c = sqlite3.connect(dbp)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def test_rate_reload_continue_in_browser(site, browser, tmp_path):
    base, st, dbp = site
    total = len(st.stimuli)
    assert total == 12
    ctx = browser.new_context(viewport={"width": 960, "height": 520})
    page = ctx.new_page()
    page.goto(base)
    assert "1 (bad)" in page.inner_text("main") and "5 (excellent)" in page.inner_text("main")
    page.fill("#name", "alice")
    with page.expect_navigation():
        page.click("#start")

    # The five labelled buttons of Ledig et al.'s scale
    labels = [page.inner_text(f"#score-{i}").split() for i in range(1, 6)]
    assert labels == [["1", "Bad"], ["2", "Poor"], ["3", "Fair"], ["4", "Good"], ["5", "Excellent"]]

    given: dict[str, int] = {}

    def rate(score: int, *, key: bool = False) -> None:
        sid = _current(page)
        assert sid not in given, "a stimulus came back after being rated"
        assert _progress(page) == f"{len(given) + 1} / {total}"
        # The image really loaded, at its own pixel size.
        assert page.eval_on_selector("#stimulus", "i => i.complete && i.naturalWidth") == 256
        with page.expect_navigation():
            if key:
                page.keyboard.press(str(score))
            else:
                page.click(f"#score-{score}")
        given[sid] = score

    for i in range(5):
        rate(i % 5 + 1)

    page.reload()
    assert _progress(page) == f"6 / {total}"
    assert _current(page) not in given
    code = page.inner_text("#resume-code").strip()
    shot = tmp_path / "mos-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MOS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MOS_SCREENSHOT"])

    rate(4, key=True)  # keyboard shortcut
    # A new tab of the same browser (same cookie) continues at the same place.
    page.close()
    page = ctx.new_page()
    page.goto(base)
    while len(given) < total:
        rate(len(given) % 5 + 1)
    assert page.is_visible("#done")
    assert _progress(page) == f"{total} / {total}"

    rows = _db(dbp, "SELECT r.name, t.stimulus, t.score FROM ratings t JOIN raters r ON r.id = t.rater")
    assert len(rows) == total
    assert {s: sc for _, s, sc in rows} == given and {n for n, _, _ in rows} == {"alice"}
    assert set(given) == set(st.stimuli)

    ctx.close()
    # A different browser (fresh cookies), same name: the name is a label, not a key to alice's
    # progress; it is refused on the start page.
    ctx, p2 = _start(browser, base, "alice")
    assert "already taken" in p2.inner_text("#error") and p2.locator("#stimulus").count() == 0
    # alice herself continues there with the resume code her rating page showed: she is done.
    p2.fill("#code", code)
    with p2.expect_navigation():
        p2.click("#resume")
    assert p2.is_visible("#done")
    ctx.close()


def test_double_click_rates_once_and_anonymous_raters(site, browser):
    base, st, dbp = site
    ctx, page = _start(browser, base)  # no name: anonymous cookie rater
    first = _current(page)
    with page.expect_navigation():
        page.dblclick("#score-2")
    page.wait_for_load_state()
    assert page.locator("#error").count() == 0  # no 409 page from a second submit
    assert _progress(page) == f"2 / {len(st.stimuli)}"
    assert _db(dbp, "SELECT stimulus, score FROM ratings") == [(first, 2)]
    assert _current(page) != first
    ctx.close()


@pytest.fixture()
def evil_site():
    """Another origin on this machine (same host, other port) serving whatever page a test sets."""
    page = {"html": b""}

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [page["html"]]

    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", page
    srv.shutdown()
    t.join(5)


def test_cross_site_form_cannot_rate(site, browser, evil_site):
    # Same host, other port: another origin but the same *site*, so the SameSite=Lax rater cookie
    # IS sent with the forged POST; only the Origin check and the CSRF token stop it.
    base, _, dbp = site
    evil, evil_page = evil_site
    ctx, page = _start(browser, base, "victim")
    sid = _current(page)
    evil_page["html"] = (
        f'<form method="post" action="{base}/rate"><input name="stimulus" value="{sid}">'
        '<input name="score" value="1"><input name="csrf" value="guess"></form>'
        "<script>document.forms[0].submit()</script>"
    ).encode()
    attack = ctx.new_page()
    with attack.expect_navigation(url=f"{base}/rate"):
        attack.goto(evil)
    assert "cross-site request refused" in attack.inner_text("#error")
    assert _db(dbp, "SELECT * FROM ratings") == []
    # The victim's own page still rates (its same-origin POST passes the same checks).
    with page.expect_navigation():
        page.click("#score-4")
    assert _db(dbp, "SELECT stimulus, score FROM ratings") == [(sid, 4)]
    ctx.close()
