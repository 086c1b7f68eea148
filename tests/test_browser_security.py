"""The feature browser under hostile input: URL-hash parameters, run folders named with markup, data files
with markup in tokens, explanations and the manifest (all in a real headless Chromium, over HTTP and from
disk), and the server's refusals (directory listings, symlinks out of the site, foreign Host headers)
and security headers over real HTTP on 127.0.0.1.

The site is built with the real build code from two tiny SAEs on the tiny GPT-2 whose run folders are
named with markup. A payload that ran sets ``window.__pwned``; the checks also fail when markup from
the URL or the data becomes an element or attribute (even one the Content-Security-Policy then blocks),
when a dialog opens, or when the page reports a CSP violation.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest
from test_browser_chromium import browser  # noqa: F401 - the shared Chromium fixture
from test_browser_site import POOL, record_edits, trained_like_sae

from saelab.explore.browser import BrowseConfig, build_browser, serve_in_thread
from saelab.explore.browser.serve import security_headers
from saelab.explore.browser.site import PAGE_CSP

PWN = "<img src=x onerror=window.__pwned=1>"
NAME_A = PWN  # a run folder named with markup, as reported
NAME_B = "\"><svg onload=window.__pwned=2>&'#?%"  # quotes, an SVG handler and URL-special characters
QPWN = urllib.parse.quote(PWN, safe="")

WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", e => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""
PROBE = """() => ({
  pwned: window.__pwned === undefined ? null : String(window.__pwned),
  csp: window.__csp,
  injected: [...document.querySelectorAll("*")]
    .filter(el => el.tagName.toLowerCase() === "img" || [...el.attributes].some(a => a.name.startsWith("on")))
    .map(el => el.outerHTML.slice(0, 120)),
})"""


@pytest.fixture(scope="module")
def hostile_site(tiny_gpt2, data_dir, tmp_path_factory):
    """A real site from two run folders whose names are markup (n = 128 and 256: families too)."""
    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    root = tmp_path_factory.mktemp("hostile")
    save_sae(trained_like_sae(tiny_gpt2, 128, 0, corpus), root / NAME_A / "sae")
    save_sae(trained_like_sae(tiny_gpt2, 256, 1, corpus), root / NAME_B / "sae")
    out = root / "site"
    build_browser([root / NAME_A, root / NAME_B], out,
                  BrowseConfig(n_tokens=31 * 64, corpus=corpus, sample_pool_tokens=POOL), lm=tiny_gpt2, progress=False)
    return out


@pytest.fixture(scope="module")
def served(hostile_site):
    server, _ = serve_in_thread(hostile_site, 0)
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _open(browser, url: str):  # noqa: F811 - `browser` is the fixture's value
    """Load ``url`` in a fresh page; returns the page and the dialogs it opened."""
    page = browser.new_page()
    dialogs: list[str] = []

    def dismiss(d):
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dismiss)
    page.add_init_script(WATCH)
    page.goto(url)
    page.wait_for_function("() => document.body.dataset.ready !== undefined", timeout=20_000)
    page.wait_for_timeout(150)  # an injected handler (img onerror) would have fired by now
    return page, dialogs


def _assert_clean(page, dialogs) -> None:
    seen = page.evaluate(PROBE)
    assert seen["pwned"] is None, f"a payload ran: window.__pwned = {seen['pwned']}"
    assert dialogs == [], dialogs
    assert seen["injected"] == [], f"markup from the URL or data became elements: {seen['injected']}"
    assert seen["csp"] == [], f"the page broke its Content-Security-Policy: {seen['csp']}"


def _sae(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# (hash, text the page must show literally or None): every parameter the routes read
INJECTIONS = [
    (f"#/s/{_sae(NAME_A)}?sort=max&dir=\"><img src=x onerror=window.__pwned=1>", None),  # the reported URL
    (f"#/s/{_sae(NAME_A)}?sort={QPWN}", None),
    (f"#/s/{_sae(NAME_A)}?dir={QPWN}", None),
    (f"#/s/{_sae(NAME_A)}?page={QPWN}", None),
    (f"#/s/{_sae(NAME_A)}?q={QPWN}", PWN),
    (f"#/s/{_sae(NAME_A)}?q=the&sort=match&dir=asc&page={QPWN}", None),
    (f"#/s/{QPWN}", PWN),
    (f"#/s/{QPWN}/l/1", PWN),
    (f"#/s/{_sae(NAME_A)}/l/{QPWN}", PWN),
    (f"#/s/{_sae(NAME_A)}/l/1/{QPWN}", None),
    (f"#/families?focus={QPWN}", PWN),
    (f"#/families?focus={_sae(NAME_A)}%3A{QPWN}", PWN),
    (f"#/families?q={QPWN}", PWN),
    (f"#/families?page={QPWN}", None),
    (f"#/{QPWN}", PWN),
    (f"#/about?x={QPWN}", None),
    ("#/s/%E0%A4%A", None),  # malformed percent-encoding
]


@pytest.mark.parametrize("fragment,literal", INJECTIONS, ids=[f"hash{i}" for i in range(len(INJECTIONS))])
def test_hash_parameters_cannot_inject(browser, served, fragment, literal):  # noqa: F811
    page, dialogs = _open(browser, served + fragment)
    _assert_clean(page, dialogs)
    if literal is not None:
        assert literal in page.inner_text("#main")
    page.close()


def test_reported_url_from_disk_cannot_inject(browser, hostile_site):  # noqa: F811
    page, dialogs = _open(browser, (hostile_site / "index.html").as_uri() + INJECTIONS[0][0])
    _assert_clean(page, dialogs)
    assert page.locator("#latents tbody tr").count() == 100
    page.close()


def test_invalid_parameters_fall_back_to_defaults(browser, served):  # noqa: F811
    page, dialogs = _open(browser, served + f"#/s/{_sae(NAME_A)}?sort=bogus&dir=sideways&page=-4")
    _assert_clean(page, dialogs)
    head = page.locator("th.on")
    assert head.get_attribute("data-sort") == "max" and "desc" in head.get_attribute("class")
    maxima = [float(t) for t in page.locator("#latents tbody tr td:nth-child(3)").all_inner_texts()[:20]]
    assert maxima == sorted(maxima, reverse=True)
    page.close()
    page, dialogs = _open(browser, served + f"#/s/{_sae(NAME_A)}/l/128")  # one past the last latent
    assert "No latent 128" in page.inner_text("#main")
    page.close()


@pytest.mark.parametrize("where", ["http", "file"])
def test_markup_run_names_show_literally(browser, served, hostile_site, where):  # noqa: F811
    base = served if where == "http" else (hostile_site / "index.html").as_uri()
    for fragment, must_show in [("", NAME_A), (f"#/s/{_sae(NAME_B)}", NAME_B), (f"#/s/{_sae(NAME_B)}/l/3", NAME_B),
                                ("#/families", NAME_B), ("#/about", NAME_A)]:
        page, dialogs = _open(browser, base + fragment)
        assert page.evaluate("document.body.dataset.ready") != "error", page.inner_text("#main")
        _assert_clean(page, dialogs)
        nav = page.locator("#nav a").all_inner_texts()
        assert [t.split()[0] for t in nav[:2]] == [NAME_A.split()[0], NAME_B.split()[0]]
        assert NAME_A in page.inner_text("#nav") and NAME_B in page.inner_text("#nav")
        assert must_show in page.inner_text("#main")
        page.close()
    page, dialogs = _open(browser, base + f"#/s/{_sae(NAME_B)}/l/3")
    assert page.inner_text("#latent-title") == f"{NAME_B} · latent #3"
    assert page.locator("#top-examples .t.act").count() > 0  # the data files of a markup name load
    page.close()


def _rewrite(path: Path, change) -> None:
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r'SAELAB\.put\(("(?:[^"\\]|\\.)*"),(.*)\);\n', text, re.S)
    value = json.loads(m.group(2))
    value = change(value) or value
    path.write_text(f"SAELAB.put({m.group(1)},{json.dumps(value, ensure_ascii=False)});\n", encoding="utf-8")


def _hostile_data(site: Path, out: Path) -> Path:
    """A copy of ``site`` whose data hold markup in every token text, explanation and manifest string."""
    shutil.copytree(site, out)
    data = out / "data"
    _rewrite(data / "vocab.js", lambda v: {t: "<img src=x onerror=window.__pwned=3>" for t in v})

    def index(ix):
        ix["expl"] = ["<img src=x onerror=window.__pwned=4>"] * ix["n_latents"]
        ix["n_tokens"] = "<img src=x onerror=window.__pwned=5>"

    def records(recs):
        for r in recs:
            r["expl"] = {"text": "<b onclick=x>e</b>", "f1": "<img src=x onerror=window.__pwned=6>",
                         "patterns": [{"text": "<img src=x onerror=window.__pwned=7>", "value": 1.5, "count": 2}]}

    def meta(m):
        p = "<img src=x onerror=window.__pwned=8>"
        m.update(model=p, hook=p, corpus=p, built=p, n_contexts=p, context_size=p, contexts_drawn=p, position_0=p,
                 definitions={p: p}, seconds={p: p})
        for s in m["saes"]:
            s.update(source=p, k=p, alive=p)

    _rewrite(data / NAME_A / "index.js", index)
    _rewrite(data / NAME_A / "l" / "0000.js", records)
    _rewrite(data / "meta.js", meta)
    record_edits(out)  # else the server refuses the site as changed since its build
    return out


def test_markup_in_data_files_shows_literally(browser, hostile_site, tmp_path):  # noqa: F811
    site = _hostile_data(hostile_site, tmp_path / "site")
    server, _ = serve_in_thread(site, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        for fragment, shows in [("", "window.__pwned=4"), (f"#/s/{_sae(NAME_A)}/l/0", "window.__pwned=3"),
                                (f"#/s/{_sae(NAME_A)}/l/0", "window.__pwned=7"), ("#/about", "window.__pwned=8"),
                                ("#/families", "window.__pwned=3")]:
            page, dialogs = _open(browser, base + fragment)
            assert page.evaluate("document.body.dataset.ready") != "error", page.inner_text("#main")
            _assert_clean(page, dialogs)
            assert f"<img src=x onerror={shows}>" in page.inner_text("#main")
            page.close()
    finally:
        server.shutdown()
        server.server_close()


def test_markup_in_an_n2g_file_shows_literally(browser, tiny_gpt2, data_dir, tmp_path):  # noqa: F811
    """The explanations of browse --n2g-file reach the index and the latent page as text: patterns made of
    markup show literally, and nothing from the file runs or becomes an element."""
    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    save_sae(trained_like_sae(tiny_gpt2, 64, 0, corpus), tmp_path / "run" / "sae")
    n2g = tmp_path / "n2g.json"
    n2g.write_text(json.dumps({"per_latent": [
        {"latent": 3, "f1": 0.5, "patterns": [
            {"tokens": ["<img src=x onerror=window.__pwned=11>", "*", "<b>"], "anchored": True, "value": 1.5,
             "count": 2},
            {"tokens": ["<svg onload=window.__pwned=12>"], "anchored": False, "value": 0.5, "count": 1}]},
        {"latent": 5, "f1": 0.0, "patterns": []}]}))  # tried, nothing found: not counted, said on its page
    res = build_browser([tmp_path / "run"], tmp_path / "site",
                        BrowseConfig(n_tokens=31 * 32, corpus=corpus, sample_pool_tokens=POOL,
                                     n2g_file=str(n2g)), lm=tiny_gpt2, progress=False)
    assert res["saes"][0]["explained"] == 1
    server, _ = serve_in_thread(tmp_path / "site", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    first = "⟨start⟩<img src=x onerror=window.__pwned=11>…<b>"
    try:
        for fragment, where in (("#/s/run?sort=id&dir=asc", "#latents"), ("#/s/run/l/3", "#explanation")):
            page, dialogs = _open(browser, base + fragment)
            assert page.evaluate("document.body.dataset.ready") != "error", page.inner_text("#main")
            _assert_clean(page, dialogs)
            assert first in page.inner_text(where)
            assert "<svg onload=window.__pwned=12>" in page.inner_text(where)
            page.close()
        page, dialogs = _open(browser, base + "#/s/run/l/5")  # N2G tried it and found no pattern
        _assert_clean(page, dialogs)
        assert page.inner_text("#explanation") == "N2G explanation none: N2G found no pattern for this latent; " \
                                                  "held-out F1 0"
        page.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("where", ["http", "file"])
def test_csp_blocks_inline_script_that_gets_in(browser, served, hostile_site, where):  # noqa: F811
    """Defence in depth: were markup to reach the page, the policy still stops its handlers and scripts."""
    page, _ = _open(browser, served if where == "http" else (hostile_site / "index.html").as_uri())
    page.evaluate("""() => {
        document.body.insertAdjacentHTML("beforeend", '<img src="x" onerror="window.__pwned=9">');
        const s = document.createElement("script"); s.textContent = "window.__pwned = 10"; document.body.append(s);
    }""")
    page.wait_for_function("() => window.__csp.length >= 2", timeout=5_000)
    assert page.evaluate("window.__pwned") is None
    assert any(v.startswith("script-src") for v in page.evaluate("window.__csp"))
    page.close()


def test_page_policy_is_in_the_html_and_strict(hostile_site):
    html = (hostile_site / "index.html").read_text(encoding="utf-8")
    metas = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert metas == [PAGE_CSP]
    directives = {d.split()[0]: d.split()[1:] for d in PAGE_CSP.split(";")}
    assert directives["default-src"] == ["'self'"]
    assert "script-src" not in directives and "style-src" not in directives  # no inline exception anywhere
    assert not re.search(r"<script>|\son\w+=|style=", html)  # nothing inline that the policy would block
    assert not re.search(r"""style=|\son\w+=""", (hostile_site / "app.js").read_text(encoding="utf-8"))


def test_a_name_that_is_no_folder_is_refused(tiny_gpt2, data_dir, tmp_path):
    """A run given as RUN/sub/.. is named "..": its pages would land outside data/, so the build refuses it."""
    from saelab.errors import ConfigError
    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    save_sae(trained_like_sae(tiny_gpt2, 64, 0, corpus), tmp_path / "run" / "sae")
    (tmp_path / "run" / "sub").mkdir()
    with pytest.raises(ConfigError, match=r"SAE name '\.\.': expected a name usable as one folder name"):
        build_browser([tmp_path / "run" / "sub" / ".."], tmp_path / "site",
                      BrowseConfig(n_tokens=500, corpus=corpus, sample_pool_tokens=POOL), lm=tiny_gpt2, progress=False)
    assert not (tmp_path / "site").exists()


# ---- the server over real HTTP ------------------------------------------------------------------------------

def _request(port: int, path: str, host: str | None = "default") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", f"127.0.0.1:{port}" if host == "default" else host)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


@pytest.fixture()
def site_with_links(hostile_site, tmp_path):
    """A copy of the site with symlinks: one to a file outside it, one to a folder outside, one inside."""
    site = tmp_path / "site"
    shutil.copytree(hostile_site, site)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET")
    (site / "leak.txt").symlink_to(outside / "secret.txt")
    (site / "data" / "leakdir").symlink_to(outside, target_is_directory=True)
    (site / "alias.css").symlink_to(site / "style.css")
    (tmp_path / "beside.txt").write_text("TOP SECRET")
    server, _ = serve_in_thread(site, 0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_server_refuses_listings_symlinks_out_and_foreign_hosts(site_with_links):
    port = site_with_links
    status, _, body = _request(port, "/")
    assert status == 200 and b"app.js" in body  # the site's own index.html
    for path in ("/data/", "/data", f"/data/{_sae(NAME_A)}/", f"/data/{_sae(NAME_A)}/l", "/app.js/"):
        status, _, body = _request(port, path)
        assert status == 404 and b"index.js" not in body and b"meta.js" not in body, (path, status)
    for path in ("/leak.txt", "/data/leakdir/secret.txt", "/data/leakdir/"):
        status, _, body = _request(port, path)
        assert status == 403 and b"TOP SECRET" not in body, (path, status)
    for path in ("/../beside.txt", "/%2e%2e/beside.txt", "/data/..%2f..%2fbeside.txt"):
        status, _, body = _request(port, path)
        assert status == 404 and b"TOP SECRET" not in body, (path, status)
    assert _request(port, "/alias.css")[0] == 200  # a link that stays inside the site is fine
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        assert _request(port, "/index.html", host)[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"127.0.0.1.evil:{port}",
                 f"localhost:{port}@evil", "", None):
        status, _, body = _request(port, "/data/meta.js", host)
        assert status == 403 and b"SAELAB.put" not in body, (host, status)


def test_server_refuses_requests_from_other_sites(site_with_links):
    port = site_with_links
    for fetch_site, mode, dest, want in (("cross-site", "no-cors", "script", 403), ("same-site", "no-cors", "script", 403),
                                         ("cross-site", "cors", "empty", 403), ("cross-site", "navigate", "iframe", 403),
                                         ("same-origin", "no-cors", "script", 200), ("none", "navigate", "document", 200),
                                         ("cross-site", "navigate", "document", 200)):  # following a link is fine
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/data/meta.js", headers={"Sec-Fetch-Site": fetch_site, "Sec-Fetch-Mode": mode,
                                                      "Sec-Fetch-Dest": dest})
        r = conn.getresponse()
        assert r.status == want and (b"SAELAB.put" in r.read()) == (want == 200), (fetch_site, mode, dest, r.status)
        conn.close()


def test_another_origin_cannot_read_the_data_files(browser, served, tmp_path):  # noqa: F811
    """A page on another origin defines SAELAB.put and includes a data file with <script src>: it gets nothing."""
    import functools
    import http.server
    import threading

    (tmp_path / "evil.html").write_text(f"""<!doctype html><script>window.SAELAB = {{put: (k, v) => {{ window.__stolen = k; }}}};
      window.__loaded = "pending";</script>
      <script src="{served}data/meta.js" onload="window.__loaded = 'yes'" onerror="window.__loaded = 'no'"></script>""")
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/evil.html")
        page.wait_for_function("() => window.__loaded !== 'pending'", timeout=10_000)
        assert page.evaluate("window.__stolen") is None and page.evaluate("window.__loaded") == "no"
        page.close()
    finally:
        evil.shutdown()
        evil.server_close()


def test_server_sends_security_headers_on_every_response(site_with_links):
    port = site_with_links
    for path, host, want in (("/", "default", 200), ("/data/meta.js", "default", 200), ("/app.js", "default", 200),
                             ("/data/", "default", 404), ("/leak.txt", "default", 403), ("/", "evil.example", 403)):
        status, headers, _ = _request(port, path, host)
        assert status == want, (path, status)
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
        csp = headers["content-security-policy"]
        assert csp.startswith(PAGE_CSP) and "frame-ancestors 'none'" in csp, path
        assert headers == {**headers, **{k.lower(): v for k, v in security_headers().items()}}
    _, headers, _ = _request(port, "/data/meta.js")
    assert headers["content-type"].startswith("text/javascript")  # nosniff needs the right type for scripts
