"""The feature browser in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The site (two SAEs on the tiny GPT-2, real Wikipedia text; or the site named by ``$SAELAB_BROWSER_SITE``)
is served on 127.0.0.1; the test loads the
index, sorts it, runs a search, opens a latent page and checks its highlighted tokens and tooltip,
opens the families view, and loads the site from disk (file://). Every request the page makes must
go to the local server: anything else is aborted and fails the test. Screenshots are kept in
``$SAELAB_TEST_ARTIFACTS/browser`` (default ``tests/artifacts/browser``, not committed).

Skipped, with the reason, when Playwright or Chromium is missing, except under CI (``CI`` set),
where that is a failure: CI installs both (``.ci/run``, the ``test`` extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest
import torch

from saelab.explore.browser import BrowseConfig, build_browser, serve_in_thread

CHROMIUM = os.environ.get("SAELAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("SAELAB_TEST_ARTIFACTS", Path(__file__).parent / "artifacts")) / "browser"


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must have it (see .ci/run and the 'test' extra in pyproject.toml)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install 'saelab[test]')")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        _missing(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served_site(request, data_dir, tmp_path_factory):
    """A two-SAE site on the tiny GPT-2, or the finished site named by $SAELAB_BROWSER_SITE (any site with
    feature families, e.g. one built on the default model)."""
    given = os.environ.get("SAELAB_BROWSER_SITE")
    if given:
        out = Path(given)
    else:
        from test_browser_site import trained_like_sae

        from saelab.sae import save_sae

        tiny_gpt2 = request.getfixturevalue("tiny_gpt2")
        corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
        root = tmp_path_factory.mktemp("chromium")
        save_sae(trained_like_sae(tiny_gpt2, 128, 0, corpus), root / "n128" / "sae")
        save_sae(trained_like_sae(tiny_gpt2, 512, 1, corpus), root / "n512" / "sae")
        out = root / "site"
        build_browser([root / "n128", root / "n512"], out, BrowseConfig(n_tokens=31 * 96, corpus=corpus),
                      lm=tiny_gpt2, progress=False)
    server, _ = serve_in_thread(out, 0)
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _index(site: Path, name: str) -> dict:
    text = (site / "data" / name / "index.js").read_text()
    return json.loads(re.fullmatch(r'SAELAB\.put\("[^"]+",(.*)\);\n', text, re.S).group(1))


def _wait(page) -> None:
    # a function, not an expression: Playwright polls an expression with eval, which the site's CSP forbids
    page.wait_for_function("() => document.body.dataset.ready === (location.hash || '#/')", timeout=20_000)


def test_pages_search_latent_and_families_in_chromium(browser, served_site):
    site, base = served_site
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, foreign = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    def only_local(route):
        if route.request.url.startswith(base) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)

    manifest = json.loads((site / "site.json").read_text())
    names = [s["name"] for s in manifest["saes"]]
    link = json.loads((site / "families.json").read_text())["links"][0]
    child_sae = link["child_sae"]

    # index: the first SAE's latents, 100 rows a page
    page.goto(base)
    _wait(page)
    assert page.locator("#latents tbody tr").count() == min(100, manifest["saes"][0]["n_latents"])
    assert names[0] in page.inner_text("h1")
    page.screenshot(path=str(ARTIFACTS / "index.png"))

    # sort by density (descending), then check the order shown
    page.click("th[data-sort=density] a")
    _wait(page)
    shown = page.locator("#latents tbody tr td:nth-child(2)").all_inner_texts()
    as_num = [float(t.rstrip("%")) for t in shown[:20]]
    assert as_num == sorted(as_num, reverse=True)

    # search a token that latent tops: it comes back among the results
    ix = _index(site, child_sae)
    vocab = json.loads(re.fullmatch(r'SAELAB\.put\("vocab",(.*)\);\n', (site / "data" / "vocab.js").read_text(),
                                    re.S).group(1))
    with_parent = {c["child"] for c in link["children"]}
    target, word = next((i, vocab[str(t[0][0])].strip()) for i, t in enumerate(ix["top_tokens"])
                        if t and vocab[str(t[0][0])].strip().isalpha() and i in with_parent)
    page.goto(base + f"#/s/{child_sae}")
    _wait(page)
    page.fill("#q", word)
    page.press("#q", "Enter")
    _wait(page)
    assert "match" in page.inner_text("#results")
    hits = page.locator("#latents tbody tr td:first-child a").all_inner_texts()
    assert hits and f"#{target}" in hits
    page.screenshot(path=str(ARTIFACTS / "search.png"))

    # a latent page: highlighted contexts, hover shows the value, histogram, logits, neighbours
    page.click(f"#latents tbody a:text-is('#{target}')")
    _wait(page)
    assert page.inner_text("#latent-title") == f"{child_sae} · latent #{target}"
    active = page.locator("#top-examples .t.act")
    assert active.count() > 0
    assert float(active.first.get_attribute("data-act")) > 0
    assert "rgba" in active.first.get_attribute("style")
    assert page.locator("#top-examples .t.peak").count() == page.locator("#top-examples .ex").count()
    assert page.locator("#bands .ex").count() > 0
    assert page.locator("svg[aria-label='activation histogram'] rect").count() > 0
    page.locator("#top-examples .t.peak").first.hover()
    tip = page.locator("#tip")
    assert tip.is_visible() and re.search(r"\d", tip.inner_text())
    page.screenshot(path=str(ARTIFACTS / "latent.png"), full_page=True)

    # families: trees of latents across the two sizes, linked to latent pages
    page.goto(base + "#/families")
    _wait(page)
    assert page.locator("details.fam").count() > 0
    assert page.locator("#families .node").count() > page.locator("details.fam").count()
    page.screenshot(path=str(ARTIFACTS / "families.png"))
    page.fill("#q", word)  # searching from the families view finds families
    page.press("#q", "Enter")
    _wait(page)
    assert "families with a latent matching" in page.inner_text("#results")
    assert page.locator(f"#families .node.focus[data-node='{child_sae}:{target}']").count() == 1
    page.goto(base + "#/families")
    _wait(page)
    page.locator("#families .node .node a").first.click()
    _wait(page)
    assert page.locator("#latent-title").inner_text().startswith(f"{child_sae} · latent #")
    assert page.locator("text=Parent in").count() == 1

    assert foreign == [], f"the site asked for other hosts: {foreign}"
    assert errors == [], errors
    page.close()


def test_site_opens_from_disk_without_a_server(browser, served_site):
    site, _ = served_site
    page = browser.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    first = json.loads((site / "site.json").read_text())["saes"][0]["name"]
    page.goto((site / "index.html").as_uri() + f"#/s/{first}/l/5")
    _wait(page)
    assert page.inner_text("#latent-title") == f"{first} · latent #5"
    assert all(u.startswith(("file://", "data:")) for u in requested), requested
    page.close()


def test_explained_latents_sort_first_and_a_space_token_shows(browser, tiny_gpt2, data_dir, tmp_path):
    """Sorting by explanation puts the explained latents first in either direction; a token that is a lone
    space shows as ␣ (it was an empty chip), as newlines and tabs show as ↵ and ⇥; a bell or an escape shows as
    `saelab top` shows it (it showed as nothing, in chips and in the examples' text)."""
    from test_browser_site import POOL, record_edits, trained_like_sae

    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    save_sae(trained_like_sae(tiny_gpt2, 64, 0, corpus), tmp_path / "run" / "sae")
    n2g = tmp_path / "n2g.json"
    n2g.write_text(json.dumps({"per_latent": [
        {"latent": i, "f1": 0.5, "patterns": [{"tokens": ["the"], "anchored": False, "value": 1.0, "count": 1}]}
        for i in (3, 40)]}))
    site = tmp_path / "site"
    cfg = BrowseConfig(n_tokens=31 * 32, corpus=corpus, sample_pool_tokens=POOL, n2g_file=str(n2g))
    build_browser([tmp_path / "run"], site, cfg, lm=tiny_gpt2, progress=False)
    top = next(i for i, t in enumerate(_index(site, "run")["top_tokens"]) if t)
    vocab_js = site / "data" / "vocab.js"
    vocab = json.loads(re.fullmatch(r'SAELAB\.put\("vocab",(.*)\);\n', vocab_js.read_text(), re.S).group(1))
    vocab[str(_index(site, "run")["top_tokens"][top][0][0])] = " "  # the token it fires most on, made a space
    other = next(i for i, t in enumerate(_index(site, "run")["top_tokens"]) if t and i != top)
    vocab[str(_index(site, "run")["top_tokens"][other][0][0])] = "a\x07b\x1b[2J\r"  # and another's made controls
    vocab_js.write_text(f'SAELAB.put("vocab",{json.dumps(vocab)});\n')
    record_edits(site)  # else the server refuses the site as changed since its build
    server, _ = serve_in_thread(site, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    page = browser.new_page()
    try:
        for d in ("desc", "asc"):
            page.goto(base + f"#/s/run?sort=expl&dir={d}")
            _wait(page)
            shown = page.locator("#latents tbody tr td:first-child a").all_inner_texts()
            assert sorted(shown[:2]) == ["#3", "#40"], (d, shown[:5])
        page.goto(base + "#/s/run?sort=id&dir=asc")
        _wait(page)
        assert page.locator(f"#latents tbody tr:nth-child({top + 1}) td:nth-child(5) .tok").first.inner_text() == "␣"
        page.goto(base + f"#/s/run/l/{top}")
        _wait(page)
        assert page.locator(".card .tok").first.inner_text() == "␣"
        page.goto(base + f"#/s/run/l/{other}")
        _wait(page)
        assert page.locator(".card .tok").first.inner_text() == "a\\x07b\\x1b[2J\\r"
        shown = page.locator(".ex .text").all_inner_texts()
        assert shown and not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "".join(shown)), shown
        assert any("a\\x07b" in text for text in shown)  # the token in its examples, as in its chip
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def test_a_word_searched_finds_the_tokens_it_is_split_into(browser, tiny_gpt2, tmp_path):
    """Byte-level BPE splits "🎉" (F0 9F 8E 89) into " \\xf0\\x9f" | "\\x8e" | "\\x89", shown as their bytes,
    and "planetarium" into " planet" | "arium": searching the emoji or the word found none of them. A token
    holding part of a character of the word, or of at least 3 characters inside the word, now counts as
    part of it."""
    from test_browser_site import trained_like_sae

    from saelab.sae import save_sae

    words = ("🎉", "中文", "planetarium")
    (tmp_path / "c.txt").write_text("Das Wort ünïcödé, 中文 und 🎉 stehen im planetarium hier. " * 60,
                                    encoding="utf-8")
    corpus = str(tmp_path / "c.txt")
    save_sae(trained_like_sae(tiny_gpt2, 512, 0, corpus), tmp_path / "run" / "sae")
    site = tmp_path / "site"
    build_browser([tmp_path / "run"], site, BrowseConfig(n_tokens=31 * 16, corpus=corpus), lm=tiny_gpt2,
                  progress=False)
    vocab = json.loads(re.fullmatch(r'SAELAB\.put\("vocab",(.*)\);\n', (site / "data" / "vocab.js").read_text(),
                                    re.S).group(1))
    as_bytes = {w: w.encode().decode("ascii", errors="backslashreplace") for w in words}
    def piece(token: str, word: str) -> bool:
        x = token.strip().lower()
        return x in as_bytes[word] if "\\x" in token else len(x) >= 3 and x in word

    # per word, the latents that fire most on one of its pieces: a token holding part of one of its
    # characters, or a token of at least 3 characters inside it
    targets = {w: [i for i, top in enumerate(_index(site, "run")["top_tokens"]) for t, _ in top[:1]
                   if piece(vocab[str(t)], w)] for w in words}
    assert all(targets.values()), targets
    server, _ = serve_in_thread(site, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    page = browser.new_page()
    try:
        for word in words:
            page.goto(base + "#/s/run")
            _wait(page)
            page.fill("#q", word)
            page.press("#q", "Enter")
            _wait(page)
            assert page.locator("#results .query").inner_text() == word
            n = int(re.match(r"([\d,]+) latents? match", page.inner_text("#results"))[1].replace(",", ""))
            hits = set()
            for p in range(-(-n // 100)):  # every page of results, 100 a page
                page.goto(base + "#/s/run?" + urlencode({"q": word, "page": p}))
                _wait(page)
                hits |= set(page.locator("#latents tbody tr td:first-child a").all_inner_texts())
            assert {f"#{i}" for i in targets[word]} <= hits and len(hits) == n, (word, n)
        # a count of one reads in the singular (the page's own wording helper)
        said = page.evaluate("() => [1, 2, 1234].map(n => count(n, 'latent matches', 'latents match'))")
        assert said == ["1 latent matches", "2 latents match", "1,234 latents match"]
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def test_each_sae_shows_its_own_tokens_scored(browser, tiny_gpt2, data_dir, tmp_path):
    """Of SAEs trained with and without position 0, the About page gave one count of tokens scored and every
    latent's histogram the same; each SAE now shows its own count and whether position 0 is scored. The page says
    how the contexts were drawn (site.json's contexts_drawn)."""
    from test_browser_site import trained_like_sae

    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    with_bos = trained_like_sae(tiny_gpt2, 64, 0, corpus)
    with_bos.cfg.exclude_first = False
    save_sae(with_bos, tmp_path / "with" / "sae")
    save_sae(trained_like_sae(tiny_gpt2, 128, 1, corpus), tmp_path / "without" / "sae")
    site = tmp_path / "site"
    build_browser([tmp_path / "without", tmp_path / "with"], site, BrowseConfig(n_tokens=31 * 8, corpus=corpus),
                  lm=tiny_gpt2, progress=False)
    page = browser.new_page()
    try:
        page.goto((site / "index.html").as_uri() + "#/about")
        _wait(page)
        about = page.inner_text("#main")
        assert "without: 128 latents" in about and "248 tokens scored (position 0 excluded), from" in about
        assert "with: 64 latents" in about and "256 tokens scored (position 0 included), from" in about
        assert "8 contexts of 32 tokens drawn at random (seed 0) from the corpus's first 4,194,304 tokens, " in about
        for name, n_tokens in (("with", 256), ("without", 248)):
            density = _index(site, name)["density"]
            page.goto((site / "index.html").as_uri() + f"#/s/{name}/l/{density.index(max(density))}")
            _wait(page)
            assert f"nonzero activations over {n_tokens} tokens" in page.inner_text("#main")
    finally:
        page.close()


def test_a_relu_sae_shows_as_relu_not_as_a_k(browser, tiny_gpt2, data_dir, tmp_path):
    """A ReLU SAE (k = n_latents, every positive latent kept) was labelled "k = 64" in its index's header and on
    the About page; it reads "ReLU" there, a top-k SAE beside it keeps its k, and site.json and families.json
    record which."""
    from test_browser_site import POOL, trained_like_sae

    from saelab.sae import ReLUSAE, relu_config, save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    topk = trained_like_sae(tiny_gpt2, 32, 0, corpus)
    relu = ReLUSAE(relu_config(64, 64, hook_name=topk.cfg.hook_name, model_name="tiny", context_size=32))
    with torch.no_grad():
        relu.b_dec.copy_(topk.b_dec)
    save_sae(topk, tmp_path / "topk" / "sae")
    save_sae(relu, tmp_path / "relu" / "sae")
    site = tmp_path / "site"
    build_browser([tmp_path / "topk", tmp_path / "relu"], site,
                  BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL), lm=tiny_gpt2, progress=False)
    for record in ("site.json", "families.json"):
        saes = json.loads((site / record).read_text())["saes"]
        assert [(s["activation"], s["k"]) for s in saes] == [("topk", 8), ("relu", None)], record
    page = browser.new_page()
    try:
        page.goto((site / "index.html").as_uri() + "#/s/relu")
        _wait(page)
        assert page.inner_text("h1").startswith("relu 64 latents, ReLU, blocks.1.hook_resid_post of ")
        page.goto((site / "index.html").as_uri() + "#/s/topk")
        _wait(page)
        assert page.inner_text("h1").startswith("topk 32 latents, k = 8, ")
        page.goto((site / "index.html").as_uri() + "#/about")
        _wait(page)
        about = page.inner_text("#main")
        assert "relu: 64 latents, ReLU, " in about and "topk: 32 latents, k = 8, " in about
        assert "k = 64" not in about
    finally:
        page.close()


def test_a_long_token_makes_a_short_chip_and_shows_whole_in_its_title(browser, tiny_gpt2, data_dir, tmp_path):
    """A chip of "↵" and 46 spaces (code indentation) was 376 px wide, and a long token's as long as its text: the
    spaces are counted ("↵␣×46"), and a chip past 24 characters is cut with "…", its whole text (escaped, as the
    chip's) in its title."""
    from test_browser_site import POOL, trained_like_sae

    from saelab.sae import save_sae

    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    save_sae(trained_like_sae(tiny_gpt2, 64, 0, corpus), tmp_path / "run" / "sae")
    site = tmp_path / "site"
    build_browser([tmp_path / "run"], site, BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL),
                  lm=tiny_gpt2, progress=False)
    tops = _index(site, "run")["top_tokens"]
    spaced, long = [i for i, t in enumerate(tops) if t][:2]
    vocab_js = site / "data" / "vocab.js"
    vocab = json.loads(re.fullmatch(r'SAELAB\.put\("vocab",(.*)\);\n', vocab_js.read_text(), re.S).group(1))
    long_text = "<i>" + "x" * 60
    vocab[str(tops[spaced][0][0])], vocab[str(tops[long][0][0])] = "\n" + " " * 46, long_text
    vocab_js.write_text(f'SAELAB.put("vocab",{json.dumps(vocab)});\n')
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto((site / "index.html").as_uri() + "#/s/run?sort=id&dir=asc")
        _wait(page)
        first_chip = "#latents tbody tr:nth-child({}) td:nth-child(5) .tok >> nth=0"
        chip = page.locator(first_chip.format(spaced + 1))
        assert chip.inner_text() == "↵␣×46" and chip.bounding_box()["width"] < 80, chip.bounding_box()
        assert chip.get_attribute("title") == "↵␣×46"  # every chip has one: wide glyphs are cut at fewer characters
        chip = page.locator(first_chip.format(long + 1))
        assert chip.get_attribute("title") == long_text and chip.inner_text() == long_text
        assert chip.bounding_box()["width"] < 230, chip.bounding_box()  # 24 characters of 13 px mono, and padding
        assert page.locator("#latents i").count() == 0  # the token's markup stayed text
    finally:
        page.close()


def test_a_served_site_loads_while_each_file_is_checked_as_served(browser, served_site, tmp_path):
    """The server checks each file against site.json as it serves it (hashing a file whose time changed): a site
    whose every file was touched since the server started still loads whole in Chromium, and a page file written
    over is answered 409, not served."""
    site, _ = served_site
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    server, _ = serve_in_thread(copy, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        later = (copy / "site.json").stat().st_mtime_ns + 10**9
        for path in (p for p in copy.rglob("*") if p.is_file()):
            os.utime(path, ns=(later, later))  # the same bytes at another time: each hashed when first served
        first = json.loads((copy / "site.json").read_text())["saes"][0]["name"]
        page, errors, statuses = browser.new_page(), [], {}
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: statuses.__setitem__(r.url.removeprefix(base), r.status))
        page.goto(base + f"#/s/{first}/l/5")
        _wait(page)
        assert page.inner_text("#latent-title") == f"{first} · latent #5" and not errors
        assert statuses[f"data/{first}/l/0000.js"] == 200 and set(statuses.values()) == {200}, statuses
        chunk = copy / "data" / first / "l" / "0000.js"
        chunk.write_text(chunk.read_text().replace('"id":5,', '"id":5 ,', 1))
        os.utime(chunk, ns=(later + 10**9,) * 2)
        with page.expect_response(base + f"data/{first}/l/0000.js", timeout=20_000) as answer:
            page.reload()
        assert answer.value.status == 409  # its one-line body: test_browser_site.py, over urllib
        page.close()
    finally:
        server.shutdown()
        server.server_close()
