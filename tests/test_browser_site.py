"""The feature browser site: built for real SAE files (saelab run folder, SAELens folder, OpenAI .pt) on the
tiny GPT-2 over real Wikipedia text; its files, data, atomic replacement, errors, server and CLI verbs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError, RunExistsError
from saelab.explore.browser import BrowseConfig, build_browser, build_families, make_server, serve_in_thread
from saelab.explore.browser import site as site_module
from saelab.explore.browser.serve import ServeError
from saelab.explore.browser.site import external_references, read_site_manifest
from saelab.sae import SAEConfig, TopKSAE, save_sae

HOOK = "blocks.1.hook_resid_post"
N_TOKENS = 31 * 96  # 96 contexts of 32 tokens, position 0 not scored
POOL = 65_536
"""The tokens a build draws its contexts from where the draw is not what a test checks: about those of the first batch
of documents read, tokenized anyway (the default pool, all of the eval split, takes seconds more a build)."""


def trained_like_sae(lm, n: int, seed: int, corpus: str) -> TopKSAE:
    """A random SAE centred on the data (b_dec = mean activation) so its latents fire at varied rates; it records
    ``lm`` by its name."""
    from saelab.data import token_contexts

    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=n, k=8, hook_name=HOOK, model_name=lm.name, context_size=32))
    toks = token_contexts(corpus, lm.tokenize, 32, n_contexts=8, bos_token_id=lm.bos_token_id)
    with torch.no_grad():
        sae.b_dec.copy_(lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64).mean(0))
    return sae


@pytest.fixture(scope="module")
def corpus(data_dir) -> str:
    return str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")


@pytest.fixture(scope="module")
def sae_files(tiny_gpt2, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    save_sae(trained_like_sae(tiny_gpt2, 128, 0, corpus), root / "run_small" / "sae")  # a run folder
    save_sae(trained_like_sae(tiny_gpt2, 512, 1, corpus), root / "saelens_large")  # a SAELens folder
    return root


@pytest.fixture(scope="module")
def site(tiny_gpt2, sae_files, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "browser"
    cfg = BrowseConfig(n_tokens=N_TOKENS, corpus=corpus, n_top=6, n_samples=8, lm_batch_size=8)
    result = build_browser([sae_files / "run_small", sae_files / "saelens_large"], out, cfg, lm=tiny_gpt2,
                           progress=False)
    return out, result, cfg


def read_js(path: Path):
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r'SAELAB\.put\(("[^"]+"),(.*)\);\n', text, re.S)
    assert m, f"{path} is not a SAELAB.put(...) data file"
    return json.loads(m.group(1)), json.loads(m.group(2))


def record_edits(site: Path) -> None:
    """Record a test's edits of a built site's files in its site.json, as a build records the files it wrote: the
    server refuses a site whose files differ from their record."""
    manifest = json.loads((site / "site.json").read_text())
    (site / "site.json").write_text(json.dumps({**manifest, "files": site_module._file_record(site)}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_a_page_answers(argv: list[str], port: int) -> int:
    """``saelab ARGV`` (a `browse --serve --port PORT`), ended by Ctrl-C once a page answered (the server is then
    in serve_forever, where Ctrl-C ends it); its exit status."""
    from saelab.cli import main

    def interrupt_once_served():
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
            except OSError:
                time.sleep(0.1)
                continue
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to the main thread
            return
    # Ctrl-C raises KeyboardInterrupt however this process was started (a background job ignores SIGINT)
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_served, daemon=True).start()
        return main(argv)
    finally:
        signal.signal(signal.SIGINT, ignored)


def test_site_files_and_manifest(site):
    out, result, cfg = site
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "app.js", "style.css", "site.json", "families.json", "data"} <= names
    manifest = read_site_manifest(out)
    assert manifest["n_tokens"] == N_TOKENS and manifest["n_contexts"] == 96 and manifest["position_0"] == "excluded"
    assert [s["name"] for s in manifest["saes"]] == ["run_small", "saelens_large"]
    assert manifest["has_families"] and manifest["hook"] == HOOK
    assert sorted(manifest["files"]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")  # all but itself
                                               if p.is_file() and p.name != "site.json")
    assert set(result["seconds"]) >= {"lm", "encode", "stats", "finish", "write", "total"}
    for name, n in (("run_small", 128), ("saelens_large", 512)):
        key, ix = read_js(out / "data" / name / "index.js")
        assert key == f"index/{name}" and ix["n_latents"] == n and len(ix["density"]) == n
        chunks = sorted((out / "data" / name / "l").iterdir())
        assert len(chunks) == -(-n // ix["chunk"])
    assert not list(out.parent.glob(".browser.*"))  # no temporary folder left beside it


def test_latent_records_are_consistent(site):
    out, _, cfg = site
    _, ix = read_js(out / "data" / "run_small" / "index.js")
    _, vocab = read_js(out / "data" / "vocab.js")
    _, recs = read_js(out / "data" / "run_small" / "l" / "0000.js")
    busiest = max(range(len(recs)), key=lambda i: ix["density"][i])
    rec = recs[busiest]
    assert rec["id"] == busiest and rec["count"] > 0
    assert rec["density"] == pytest.approx(rec["count"] / N_TOKENS, rel=1e-3)
    assert len(rec["top"]) == cfg.n_top and len(rec["samples"]) == cfg.n_samples
    assert sorted(j for band in rec["bands"] for j in band) == list(range(cfg.n_samples))
    ctx, start, ids, q = rec["top"][0]
    assert max(q) == site_module.Q_SCALE  # the best context holds the latent's maximum
    assert start >= 1 and len(ids) <= cfg.window_before + cfg.window_after + 1
    assert all(str(t) in vocab for ex in rec["top"] + rec["samples"] for t in ex[2])
    assert all(str(t) in vocab for t, _ in rec["pos"] + rec["neg"])
    assert sum(rec["hist"][1]) == rec["count"]
    assert len(rec["near"]) == 8 and all(j != busiest for j, _ in rec["near"])
    vals = [v for _, v in rec["pos"]]
    assert vals == sorted(vals, reverse=True) and rec["neg"][0][1] <= rec["neg"][-1][1]


def test_top_contexts_come_from_many_articles_and_the_site_says_how_they_were_drawn(site, eval_article_of):
    """The site read the eval split's first contexts, in order (its first article or two): every latent's top
    contexts came from them. They are drawn across the split now, as `saelab eval` draws its contexts, and
    site.json (and the About page's data/meta.js) says how."""
    out, _, cfg = site
    _, ix = read_js(out / "data" / "run_small" / "index.js")
    _, recs = read_js(out / "data" / "run_small" / "l" / "0000.js")
    busiest = recs[max(range(len(recs)), key=lambda i: ix["density"][i])]
    articles = [eval_article_of(ids) for _, _, ids, _ in busiest["top"]]
    assert len(set(articles) - {None}) >= 3, f"the top contexts come from articles {articles}"
    manifest = read_site_manifest(out)
    words = f"drawn at random (seed 0) from the corpus's first {cfg.sample_pool_tokens:,} tokens"
    assert cfg.sample_pool_tokens == 4_194_304 and manifest["contexts_drawn"] == words
    assert manifest["config"]["sample_pool_tokens"] == cfg.sample_pool_tokens
    assert read_js(out / "data" / "meta.js")[1]["contexts_drawn"] == words


def test_a_site_numbers_each_context_by_its_place_in_the_corpus(site, tiny_gpt2, corpus):
    """Each example of a latent page records its context's number (its record's first item, data-ctx on the page):
    it was the context's row in the draw, which says nothing of where its text is. It is the context's place in the
    corpus's stream of contexts, as top numbers it: the site's pool is the whole eval split, packed in order here."""
    from saelab.data import token_contexts

    out, _, _ = site
    in_order = token_contexts(corpus, tiny_gpt2.tokenize, 32, bos_token_id=tiny_gpt2.bos_token_id)
    for name in ("run_small", "saelens_large"):
        _, recs = read_js(out / "data" / name / "l" / "0000.js")
        examples = [ex for rec in recs for ex in rec["top"] + rec["samples"]]
        assert examples
        assert all(in_order[ctx, start:start + len(ids)].tolist() == ids for ctx, start, ids, _ in examples)
        assert max(ex[0] for ex in examples) >= read_site_manifest(out)["n_contexts"]  # places, not rows
    assert "context" in read_site_manifest(out)["definitions"]


def test_a_drawn_site_of_context_rows_is_not_reused_for_one_of_places(site, sae_files, tmp_path):
    """A drawn site built before its pages numbered contexts by their place in the corpus holds their rows in the draw;
    reused, the same command would show other numbers than a build now, without a word. Its key is not this build's:
    refused (pass --overwrite), named. A site read in order numbered them by place already (row = place): its key
    is unchanged, and it is reused."""
    from saelab.explore.browser.make import build_key, open_sources

    out, _, cfg = site
    both = [sae_files / "run_small", sae_files / "saelens_large"]
    sources, _ = open_sources(both)
    in_order = dataclasses.replace(cfg, sample_pool_tokens=0)
    assert build_key(sources, in_order, numbers_contexts=True) == build_key(sources, in_order)
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    manifest = json.loads((earlier / "site.json").read_text())
    inputs = {k: v for k, v in manifest["inputs"].items() if k != "context_numbers"}
    (earlier / "site.json").write_text(json.dumps({**manifest, "key": build_key(sources, cfg), "inputs": inputs}))
    for serve in (False, True):
        with pytest.raises(RunExistsError, match=r"holds a feature browser site built from contexts an earlier saelab "
                                                 r"numbered by their row in the draw \(not their place in the corpus\) "
                                                 r"\(it shows run_small, saelens_large\); pass --overwrite"):
            build_browser(both, earlier, cfg, lm="no-such-model", progress=False, keep_uncompared=serve)


def test_families_are_written_and_linked_into_pages(site):
    out, _, _ = site
    fam = json.loads((out / "families.json").read_text())
    assert fam["format"] == "saelab-feature-families" and fam["n_tokens"] == N_TOKENS
    assert [s["name"] for s in fam["saes"]] == ["run_small", "saelens_large"]
    link = fam["links"][0]
    assert link["n_children_matched"] > 0
    child = link["children"][0]
    _, recs = read_js(out / "data" / "saelens_large" / "l" / f"{child['child'] // 64:04d}.js")
    rec = recs[child["child"] % 64]
    assert rec["family"]["parent"][:2] == ["run_small", child["parent"]]


def test_site_has_no_external_reference_and_the_check_catches_one(site, tmp_path):
    out, _, _ = site
    assert external_references(out) == []
    for f in ("index.html", "app.js", "style.css"):
        text = (out / f).read_text()
        assert "http://" not in text and "https://" not in text, f
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    html = (bad / "index.html").read_text()
    (bad / "index.html").write_text(html.replace("</head>", '<script src="https://cdn.example.org/x.js"></script></head>'))
    (bad / "style.css").write_text("@import url(http://fonts.example.org/f.css);\n")
    found = external_references(bad)
    assert any("index.html" in f for f in found) and any("style.css" in f for f in found)


def test_same_inputs_reuse_the_site_and_interruption_keeps_the_old_one(site, sae_files, tiny_gpt2, monkeypatch):
    out, _, cfg = site
    stamp = (out / "site.json").stat().st_mtime_ns
    again = build_browser([sae_files / "run_small", sae_files / "saelens_large"], out, cfg, lm=tiny_gpt2,
                          progress=False)
    assert again["reused"] and (out / "site.json").stat().st_mtime_ns == stamp
    assert list(again["seconds"]) == ["total"]  # this call's time, not the phases of the build it reused
    # An evaluation written into the run folder changes its metrics, not its SAE: the site is still current.
    (sae_files / "run_small" / "metrics.json").write_text('{"nmse": 0.1}')
    try:
        again = build_browser([sae_files / "run_small", sae_files / "saelens_large"], out, cfg, lm=tiny_gpt2,
                              progress=False)
    finally:
        (sae_files / "run_small" / "metrics.json").unlink()
    assert again["reused"] and (out / "site.json").stat().st_mtime_ns == stamp
    # Other settings, other SAEs or another model dtype never replace the site unasked, and are refused
    # before the model loads.
    both = [sae_files / "run_small", sae_files / "saelens_large"]
    for saes, other, dtype, what in (
            (both, dataclasses.replace(cfg, n_top=5), "float32", rf"other settings \(browse.n_top {cfg.n_top} -> 5\) "
                                                                 r"\(it shows run_small, saelens_large\)"),
            ([sae_files / "run_small"], cfg, "float32", r"other SAEs \(run_small, saelens_large -> run_small\)"),
            (both, cfg, "bfloat16", r'other settings \(model_dtype "float32" -> "bfloat16"\) '
                                    r'\(it shows run_small, saelens_large\)'),
            # contexts read in order are not those drawn: neither site is taken for the other
            (both, dataclasses.replace(cfg, sample_pool_tokens=0), "float32",
             rf"other settings \(browse.sample_pool_tokens {cfg.sample_pool_tokens} -> 0\) "
             r"\(it shows run_small, saelens_large\)")):
        with pytest.raises(RunExistsError, match=rf"holds a feature browser site built from {what}; pass --overwrite"):
            build_browser(saes, out, other, lm="no-such-model", model_dtype=dtype, progress=False)
    assert (out / "site.json").stat().st_mtime_ns == stamp
    # An --n2g-file that is not an N2G result (here the site's manifest) is refused before the model loads.
    not_n2g = dataclasses.replace(cfg, n2g_file=str(out / "site.json"))
    with pytest.raises(CheckpointError, match="site.json: not an N2G result"):
        build_browser([sae_files / "run_small"], out, not_n2g, lm="no-such-model", overwrite=True, progress=False)
    assert (out / "site.json").stat().st_mtime_ns == stamp

    # Files the user put in the site's folder would go with it: --overwrite refuses them, before the model loads.
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    with pytest.raises(RunExistsError, match=r"^--out \S+ holds mine/, notes.txt beside a feature browser site, which "
                                             "replacing it would delete; move them out"):
        build_browser(both, out, cfg, lm="no-such-model", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "site.json").stat().st_mtime_ns == stamp
    (out / "notes.txt").unlink()
    (out / "mine").rmdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(site_module, "latent_pages", interrupted)  # Ctrl-C while writing
    with pytest.raises(KeyboardInterrupt):
        build_browser([sae_files / "run_small", sae_files / "saelens_large"], out, cfg, lm=tiny_gpt2,
                      overwrite=True, progress=False)
    assert (out / "site.json").stat().st_mtime_ns == stamp  # the finished site is untouched
    assert not list(out.parent.glob(".browser.*"))
    fresh = out.parent / "never-finished"
    with pytest.raises(KeyboardInterrupt):
        build_browser([sae_files / "run_small"], fresh, cfg, lm=tiny_gpt2, progress=False)
    assert not fresh.exists()  # no half-written site that looks complete


def test_families_are_reused_after_n2g_explanations_and_in_another_order(sae_files, tiny_gpt2, corpus, tmp_path):
    """The families file was keyed by a run's n2g.json (which it never reads) and by the order the SAEs were
    given in (the tree orders them by size): either refused the same families again."""
    shutil.copytree(sae_files / "run_small", tmp_path / "run_small")
    both = [tmp_path / "run_small", sae_files / "saelens_large"]
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL, n_top=4, n_samples=4, lm_batch_size=8)
    fam = tmp_path / "fam.json"
    assert not build_families(both, fam, cfg, lm=tiny_gpt2, progress=False)["reused"]
    (tmp_path / "run_small" / "n2g.json").write_text(json.dumps({"per_latent": [
        {"latent": 3, "patterns": [{"tokens": [" the"], "anchored": False, "value": 0.5, "count": 2}],
         "precision": 1.0}]}))
    assert build_families(both, fam, cfg, lm="no-such-model", progress=False)["reused"]
    assert build_families(both[::-1], fam, cfg, lm="no-such-model", progress=False)["reused"]
    shutil.rmtree(tmp_path / "run_small" / "sae")  # retrained: refused, naming what can have changed
    save_sae(trained_like_sae(tiny_gpt2, 128, 5, corpus), tmp_path / "run_small" / "sae")
    with pytest.raises(RunExistsError, match=r"of other SAE files \(other SAEs, the same ones retrained or replaced "
                                             r"since\); pass --overwrite"):
        build_families(both, fam, cfg, lm="no-such-model", progress=False)


def test_an_edited_corpus_file_is_not_taken_for_the_one_read_before(sae_files, tiny_gpt2, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("The cat sat on the mat. " * 400)
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=str(text), n_top=4, n_samples=4, lm_batch_size=8)
    both = [sae_files / "run_small", sae_files / "saelens_large"]
    out, fam = tmp_path / "site", tmp_path / "ff.json"
    build_browser(both, out, cfg, lm=tiny_gpt2, progress=False)
    build_families(both, fam, cfg, lm=tiny_gpt2, progress=False)
    text.write_text("Numbers 12 34 56 and 78 follow. " * 400)  # the same name, other text
    with pytest.raises(RunExistsError, match=rf"built from other corpus text \(browse.corpus {re.escape(str(text))} "
                                             r"changed since\)"):
        build_browser(both, out, cfg, lm="no-such-model", progress=False)
    with pytest.raises(RunExistsError, match=r"holds feature families of other corpus text"):
        build_families(both, fam, cfg, lm="no-such-model", progress=False)
    again = build_browser(both, out, cfg, lm=tiny_gpt2, overwrite=True, progress=False)
    assert not again["reused"] and build_browser(both, out, cfg, lm=tiny_gpt2, progress=False)["reused"]
    assert not build_families(both, fam, cfg, lm=tiny_gpt2, overwrite=True, progress=False)["reused"]


def test_openai_pt_file_builds(tiny_gpt2, corpus, tmp_path):
    g = torch.Generator().manual_seed(3)
    dec = torch.randn(64, 256, generator=g)
    dec = dec / dec.norm(dim=0, keepdim=True)
    sd = {"pre_bias": torch.zeros(64), "latent_bias": torch.zeros(256), "encoder.weight": dec.T.contiguous(),
          "decoder.weight": dec, "activation": "TopK", "activation_state_dict": {"k": 8, "postact_fn": "ReLU"},
          "stats_last_nonzero": torch.zeros(256, dtype=torch.long)}
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    cfg = BrowseConfig(n_tokens=2000, corpus=corpus, sample_pool_tokens=POOL, context_size=32)
    res = build_browser([path], tmp_path / "site", cfg, lm=tiny_gpt2, progress=False)
    assert res["hook"] == HOOK and res["saes"][0]["name"] == "1" and res["saes"][0]["input_norm"] == "layernorm"
    assert res["saes"][0]["alive"] > 0 and not res["has_families"]


def test_bad_inputs_are_named(tiny_gpt2, sae_files, corpus, tmp_path):
    empty_run = tmp_path / "run_without_sae"
    empty_run.mkdir()
    (empty_run / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match="run_without_sae: folder has no cfg.json"):
        build_browser([empty_run], tmp_path / "s1", lm=tiny_gpt2)
    other = tmp_path / "other"
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post")), other)
    with pytest.raises(Exception, match="different hooks"):
        build_browser([sae_files / "run_small", other], tmp_path / "s2", lm=tiny_gpt2)
    user_folder = tmp_path / "my-notes"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="not a saelab feature browser site"):
        build_browser([sae_files / "run_small"], user_folder,
                      BrowseConfig(n_tokens=500, corpus=corpus, sample_pool_tokens=POOL), lm=tiny_gpt2, progress=False)
    assert (user_folder / "notes.txt").read_text() == "keep me"


def test_server_is_loopback_only_and_port_in_use_is_an_error(site):
    out, _, _ = site
    server, thread = serve_in_thread(out, 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
            assert r.status == 200 and b"app.js" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/meta.js", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is in use"):
            make_server(out, port)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ServeError, match="not a finished feature browser site"):
        make_server(out / "data", 0)


def test_a_site_whose_files_changed_since_its_build_is_not_served(site, tmp_path):
    """make_server (under serve_in_thread and serve_site) served a site whose files were written over or deleted
    since its build, where a rebuild refuses such a site: refused now, in one line naming the file and
    --overwrite, before the port is bound (a port in use would be named otherwise)."""
    out, _, _ = site
    copy = tmp_path / "browser"
    shutil.copytree(out, copy)
    page, meta = copy / "data" / "run_small" / "l" / "0000.js", copy / "data" / "meta.js"
    written = page.read_bytes()
    page.write_bytes(written.replace(b"[", b"(", 1))  # the same size: only its hash tells

    def refused(why: str) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(ServeError, match=rf"^{re.escape(str(copy))} holds a feature browser site, but "
                                                 rf"{re.escape(why)}; build it again with `saelab browse` and "
                                                 r"--overwrite before serving it$"):
                make_server(copy, busy.getsockname()[1])
        with pytest.raises(ServeError, match=re.escape(why)):
            serve_in_thread(copy, 0)

    refused("its data/run_small/l/0000.js changed since it was written")
    page.write_bytes(written)
    meta.unlink()
    refused("its data/meta.js is missing")
    shutil.copyfile(out / "data" / "meta.js", meta)
    (copy / "data" / "vocab.js").write_text('SAELAB.put("vocab",{});\n')
    record_edits(copy)  # edits recorded in site.json as a build records its files: served
    server = make_server(copy, 0)
    server.server_close()


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_file_changed_while_served_is_refused_naming_it(site, tmp_path):
    """The server checked the site's files against site.json once, at start: a file written over while it served
    was served. Each file is checked as it is served now (hashed only where its size or time changed): a changed,
    missing or unlisted file is answered 409 with one line naming it and --overwrite; the same bytes put back, or
    a rebuild (a new site.json), are served again."""
    out, _, _ = site
    copy = tmp_path / "browser"
    shutil.copytree(out, copy)
    page, meta = copy / "data" / "run_small" / "l" / "0000.js", copy / "data" / "meta.js"
    written = page.read_bytes()
    server, _ = serve_in_thread(copy, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    rebuild = "rebuild it with `saelab browse` and --overwrite\n"
    try:
        assert _get(base + "data/run_small/l/0000.js") == (200, written)
        start = page.stat().st_mtime_ns

        def write(data: bytes, seconds_later: int) -> None:  # a time of its own: not within the clock's last tick
            page.write_bytes(data)
            os.utime(page, ns=(start + seconds_later * 10**9,) * 2)

        write(written.replace(b"[", b"(", 1), 1)  # the same size: only its hash tells
        changed = (409, f"data/run_small/l/0000.js changed since the site was built; {rebuild}".encode())
        assert _get(base + "data/run_small/l/0000.js") == changed
        assert _get(base + "data/run_small/l/0000.js", "HEAD") == (409, b"")
        write(written, 2)  # put back (a new time, the same bytes): hashed once, served
        assert _get(base + "data/run_small/l/0000.js") == (200, written)
        write(written.replace(b"[", b"(", 1), 2)  # size and time as last checked: not hashed again
        assert _get(base + "data/run_small/l/0000.js")[0] == 200
        (copy / "notes.txt").write_text("mine")
        assert _get(base + "notes.txt") == (409, f"notes.txt is not one of the site's files (its site.json lists "
                                                 f"none such); {rebuild}".encode())
        kept = meta.read_bytes()
        meta.unlink()
        assert _get(base + "data/meta.js") == (409, f"data/meta.js is missing since the site was built; "
                                                    f"{rebuild}".encode())
        assert _get(base + "data/nothing.js")[0] == 404  # neither listed nor there
        meta.write_bytes(kept)
        assert _get(base + "data/meta.js") == (200, kept)
        (copy / "data" / "vocab.js").write_text('SAELAB.put("vocab",{});\n')
        assert _get(base + "data/vocab.js")[0] == 409
        record_edits(copy)  # as a rebuild in place writes a new site.json with its files: read again, served
        assert _get(base + "data/vocab.js") == (200, b'SAELAB.put("vocab",{});\n')
        assert _get(base + "index.html")[0] == 200 and _get(base)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_cli_browse_serves_a_site_only_while_its_files_are_as_written(sae_files, tiny_dir, corpus, tmp_path, capsys):
    """`browse --serve` reaches the server after a build, or with the site of the same inputs reused (no build): a
    reused site whose files differ from its site.json is refused in one line, naming the file and --overwrite,
    before anything is printed or served; --overwrite --serve builds it again and serves it."""
    from saelab.cli import main
    from saelab.explore.browser.site import site_damage

    out, port = tmp_path / "site", free_port()
    browse = ["browse", str(sae_files / "run_small"), "--out", str(out), "--model", str(tiny_dir), "--corpus", corpus,
              "--sample-pool-tokens", str(POOL), "--n-tokens", "1500", "--no-progress"]
    assert main(browse) == 0
    capsys.readouterr()
    (out / "data" / "vocab.js").write_text('SAELAB.put("vocab",{});\n')
    assert main([*browse, "--serve", "--port", str(port)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip() == (
        f"saelab browse: error: {out} holds a feature browser site of these inputs and settings, but its "
        "data/vocab.js changed since it was written; pass --overwrite to build it again, or pick another --out")
    assert serve_until_a_page_answers([*browse, "--serve", "--port", str(port), "--overwrite"], port) == 0
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().out
    assert site_damage(out, read_site_manifest(out)) is None


def test_n2g_explanations_use_the_padding_token_given(split_pad_dir, corpus, tmp_path, monkeypatch):
    """On a tokenizer that splits N2G's default padding token " _", browse --n2g-n-latents raised a ValueError after
    the whole pass over the text. The default is now refused before the pass, naming the setting, and a padding
    token given that is one token builds the explanations."""
    from saelab.errors import ConfigError
    from saelab.explore.browser import make
    from saelab.models import load_model

    lm = load_model(str(split_pad_dir))
    save_sae(trained_like_sae(lm, 128, 0, corpus), tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL, n_top=4, n2g_n_latents=2)
    with monkeypatch.context() as m:
        m.setattr(make, "collect_statistics", lambda *a, **k: pytest.fail("the text was scored first"))
        with pytest.raises(ConfigError, match=r"^browse\.n2g_padding_token ' _' \(the default\) is 2 tokens for this "
                                              r"tokenizer; pick a single-token text$"):
            build_browser([tmp_path / "run"], tmp_path / "site", cfg, lm=lm, progress=False)
    assert not (tmp_path / "site").exists()
    res = build_browser([tmp_path / "run"], tmp_path / "site", dataclasses.replace(cfg, n2g_padding_token=" x"),
                        lm=lm, progress=False)
    assert res["saes"][0]["explained"] == 2 and res["inputs"]["browse"]["n2g_padding_token"] == " x"


def test_cli_browse_and_families(sae_files, tiny_dir, corpus, tmp_path, capsys):
    from saelab.cli import main

    out = tmp_path / "cli-site"
    args = ["--model", str(tiny_dir), "--corpus", corpus, "--sample-pool-tokens", str(POOL),
            "--n-tokens", "1500", "--no-progress"]
    assert main(["browse", str(sae_files / "run_small"), "--out", str(out), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["site"] == str(out) and not printed["reused"] and read_site_manifest(out)
    assert main(["browse", str(sae_files / "run_small"), "--out", str(out), *args]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["reused"]
    assert printed.err.strip() == f"{out} already holds this feature browser site (--overwrite builds it again)"
    fam = tmp_path / "families.json"
    assert main(["families", str(sae_files / "run_small"), str(sae_files / "saelens_large"), "--out", str(fam), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads(fam.read_text())["saes"][1]["n_latents"] == 512 and summary["largest"]
    # a port that is taken is refused before the build starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["browse", str(sae_files / "run_small"), "--out", str(tmp_path / "x"), "--serve", "--port",
                     str(port), *args]) == 2
    assert "is in use" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # --serve prints the summary once, before it serves: Ctrl-C ended it with the summary again
    port = free_port()
    assert serve_until_a_page_answers(["browse", str(sae_files / "run_small"), "--out", str(out), "--serve",
                                       "--port", str(port), *args], port) == 0
    served = capsys.readouterr().out
    assert served.count('"site"') == 1 and f"http://127.0.0.1:{port}/" in served
    # a SAELens folder needs --out
    assert main(["browse", str(sae_files / "saelens_large"), *args]) == 2
    assert "pass --out" in capsys.readouterr().err
    # --family-min-score with one SAE scores no families: refused, not recorded in the site to refuse a rebuild
    assert main(["browse", str(sae_files / "run_small"), "--out", str(tmp_path / "y"), "--family-min-score", "0.5",
                 *args]) == 2
    assert capsys.readouterr().err.strip().endswith("--family-min-score scores the feature families between SAEs of "
                                                    "different sizes; browse two or more, or leave it out")
    # SAEs of one size have no families (no smaller SAE holds a parent): none built, and said so
    shutil.copytree(sae_files / "run_small" / "sae", tmp_path / "twin")
    assert main(["browse", str(sae_files / "run_small"), str(tmp_path / "twin"), "--out", str(tmp_path / "z"),
                 *args]) == 0
    assert "the SAEs share a size (n_latents [128, 128]): no feature families" in capsys.readouterr().err
    assert read_site_manifest(tmp_path / "z")["has_families"] is False
    # their family score changes nothing, so it keys nothing: the site is this build (it refused as other settings)
    assert main(["browse", str(sae_files / "run_small"), str(tmp_path / "twin"), "--out", str(tmp_path / "z"),
                 "--family-min-score", "0.5", *args]) == 0
    assert json.loads(capsys.readouterr().out)["reused"]


def test_a_folder_that_is_not_a_site_is_refused_before_the_model_loads(tmp_path):
    """browse and the Neuronpedia export check their output folder first: the model named here does not
    exist, so any other order would fail on it (or score the text) before the refusal."""
    from saelab.explore.browser.build import SAESource
    from saelab.explore.browser.export import export_neuronpedia_run

    sae = SAESource("s", "mem", TopKSAE(SAEConfig(16, 64, 4, hook_name="blocks.0.hook_resid_post")))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="is not a saelab feature browser site"):
        build_browser(sae, other, lm="no-such-model-here")
    with pytest.raises(RunExistsError, match="is not a saelab Neuronpedia export"):
        export_neuronpedia_run(sae, other, lm="no-such-model-here")
    assert (other / "keep.txt").read_text() == "mine"


def test_fewer_samples_than_the_default_bands_lower_the_bands():
    """--n-samples 2 alone: two bands of one sample, not a refusal of a --n-bands never typed; a typed count
    of bands above the samples is refused."""
    from saelab.errors import ConfigError

    assert BrowseConfig(n_samples=2).n_bands == 2 and BrowseConfig().n_bands == 4
    with pytest.raises(ConfigError, match="n_bands=5 exceeds n_samples=2"):
        BrowseConfig(n_samples=2, n_bands=5)


def test_site_names_the_offline_default_by_its_hub_id(smollm2, corpus, tmp_path):
    """The site's header read "blocks.1.hook_resid_post of default", where metrics.json and report.md name
    the offline default by its hub id."""
    from saelab.models import DEFAULT_MODEL_HUB_ID

    save_sae(TopKSAE(SAEConfig(d_in=smollm2.hook_width(HOOK), n_latents=32, k=4, hook_name=HOOK)), tmp_path / "sae")
    cfg = BrowseConfig(n_tokens=256, corpus=corpus, sample_pool_tokens=POOL,
                       context_size=64, n_top=4, n_samples=4, n_bands=2)
    result = build_browser([tmp_path / "sae"], tmp_path / "site", cfg, lm=smollm2, progress=False)
    assert result["model"] == DEFAULT_MODEL_HUB_ID
    assert read_js(tmp_path / "site" / "data" / "meta.js")[1]["model"] == DEFAULT_MODEL_HUB_ID
    # the feature families of the same model name it so too (they read "default")
    save_sae(TopKSAE(SAEConfig(d_in=smollm2.hook_width(HOOK), n_latents=64, k=4, hook_name=HOOK)), tmp_path / "big")
    families = build_families([tmp_path / "sae", tmp_path / "big"], tmp_path / "f.json", cfg, lm=smollm2,
                              progress=False)
    assert families["model"] == json.loads((tmp_path / "f.json").read_text())["model"] == DEFAULT_MODEL_HUB_ID


def test_each_sae_is_shown_with_its_own_tokens_scored(tiny_gpt2, corpus, tmp_path):
    """SAEs trained with and without position 0, browsed together: each was scored from the first one's position
    (the one without it at BOS, after the other), and the site gave one count for all. Each SAE's index is now
    the one it has alone, in either order, with its own count and position 0; families count the positions
    both read, and the Neuronpedia export gives each SAE its own count."""
    from saelab.explore.browser.export import export_neuronpedia_run
    from saelab.explore.browser.make import build_key, open_sources

    with_bos = trained_like_sae(tiny_gpt2, 128, 7, corpus)
    with_bos.cfg.exclude_first = False
    save_sae(with_bos, tmp_path / "with" / "sae")
    save_sae(trained_like_sae(tiny_gpt2, 256, 8, corpus), tmp_path / "without" / "sae")
    runs = [tmp_path / "with", tmp_path / "without"]
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL,
                       n_top=4, n_samples=4, lm_batch_size=8)  # 8 contexts each way
    own = {"with": (8 * 32, "included"), "without": (8 * 31, "excluded")}
    alone = {}
    for run in runs:
        build_browser([run], tmp_path / f"alone-{run.name}", cfg, lm=tiny_gpt2, progress=False)
        alone[run.name] = read_js(tmp_path / f"alone-{run.name}" / "data" / run.name / "index.js")[1]
    for i, order in enumerate((runs, runs[::-1])):
        out = tmp_path / f"site{i}"
        manifest = build_browser(order, out, cfg, lm=tiny_gpt2, progress=False)
        assert {s["name"]: (s["n_tokens"], s["position_0"]) for s in manifest["saes"]} == own
        assert (manifest["n_tokens"], manifest["position_0"]) == own["without"]  # the tokens both read
        families = json.loads((out / "families.json").read_text())
        assert (families["n_tokens"], families["position_0"]) == own["without"]
        for name in own:
            assert read_js(out / "data" / name / "index.js")[1] == alone[name]
            assert alone[name]["n_tokens"] == own[name][0]
    export_neuronpedia_run(runs, tmp_path / "np", cfg, lm=tiny_gpt2, progress=False)
    for name, (n_tokens, _) in own.items():
        assert json.loads((tmp_path / "np" / name / "run_settings.json").read_text())["n_tokens_scored"] == n_tokens
    # files an earlier saelab wrote (other keys, records without the new marks) are refused saying why
    settings = tmp_path / "np" / "without" / "run_settings.json"
    earlier = json.loads(settings.read_text())
    del earlier["inputs"]["export_version"]
    settings.write_text(json.dumps({**earlier, "key": "0" * 16}))
    with pytest.raises(RunExistsError, match="an earlier saelab's export, whose n_tokens_in_prompt counted the BOS"):
        export_neuronpedia_run(runs, tmp_path / "np", cfg, lm=tiny_gpt2, progress=False)
    build_families(runs, tmp_path / "families.json", cfg, lm=tiny_gpt2, progress=False)
    families = json.loads((tmp_path / "families.json").read_text())
    del families["inputs"]["first_scored"]
    (tmp_path / "families.json").write_text(json.dumps({**families, "key": "0" * 16}))
    with pytest.raises(RunExistsError, match="SAEs scored by an earlier saelab, which read every SAE from the first"):
        build_families(runs, tmp_path / "families.json", cfg, lm=tiny_gpt2, progress=False)
    # OTHER SAEs are named as such (by their names), whichever of the two differs in position 0
    save_sae(trained_like_sae(tiny_gpt2, 64, 8, corpus), tmp_path / "third" / "sae")
    same = [runs[1], tmp_path / "third"]  # neither reads position 0
    build_families(same, tmp_path / "one.json", cfg, lm=tiny_gpt2, progress=False)
    with pytest.raises(RunExistsError, match=r"of other SAEs \(\w+, \w+ -> \w+, \w+\)"):
        build_families(runs, tmp_path / "one.json", cfg, lm=tiny_gpt2, progress=False)
    build_families(runs, tmp_path / "both.json", cfg, lm=tiny_gpt2, progress=False)
    with pytest.raises(RunExistsError, match=r"of other SAEs \(\w+, \w+ -> \w+, \w+\)"):
        build_families(same, tmp_path / "both.json", cfg, lm=tiny_gpt2, progress=False)
    export_neuronpedia_run(runs[1:], tmp_path / "np1", cfg, lm=tiny_gpt2, progress=False)
    with pytest.raises(RunExistsError, match=r"from other SAEs \(without -> with\)"):
        export_neuronpedia_run(runs[:1], tmp_path / "np1", cfg, lm=tiny_gpt2, progress=False)
    # a site of these SAEs built before, when both were scored from the first one's position, is not reused
    sources, _ = open_sources(runs)
    key = build_key(sources, cfg)
    sources[0].sae.cfg.exclude_first = True
    assert build_key(sources, cfg) != key


def test_a_renamed_setting_keeps_earlier_builds_keys_and_is_named_as_it_is_now():
    """browse's N2G count became n2g_n_latents (as eval's): keys still hash it under its earlier name, so that a
    rebuild of an unchanged site is reused. Sites, families files and exports recorded it as n2g_latents beside
    config.n2g_n_latents; they record it by its name now, and a record under the old name still reads as it."""
    from saelab.explore.browser.make import build_inputs, unkeyed_record, what_differs

    before, after = (build_inputs([], BrowseConfig(n2g_n_latents=n)) for n in (0, 3))
    assert before["browse"]["n2g_n_latents"] == 0 and "n2g_latents" not in before["browse"]
    assert what_differs(before, after) == "other settings (browse.n2g_n_latents 0 -> 3)"
    earlier = {**before, "browse": {("n2g_latents" if k == "n2g_n_latents" else k): v
                                    for k, v in before["browse"].items()}}
    assert what_differs(earlier, after) == "other settings (browse.n2g_n_latents 0 -> 3)"
    assert what_differs(earlier, before) == "other inputs or settings"  # the same settings: no setting differs
    # the keys of builds before the rename (a hub corpus: no local files in the key), as they were recorded before
    # keys were keyed: what the key hashes is unchanged
    # (read in order, as builds were then)
    assert unkeyed_record([], BrowseConfig(corpus="someone/texts", n2g_n_latents=3, sample_pool_tokens=0))["key"] \
        == "1b861e9173c2b93f"


def test_a_build_read_in_order_keeps_its_key_at_sample_pool_tokens_0_and_is_not_taken_for_a_drawn_one():
    """Sites, families files and exports built before the contexts were drawn read the corpus's first contexts in
    order: their key is that of sample_pool_tokens 0 (left out of the key there), so the same build asked for in
    order reuses them; at the default they are of other settings (refused unless --overwrite), named as such."""
    from saelab.explore.browser.make import build_inputs, unkeyed_record, what_differs

    cfg = BrowseConfig(corpus="someone/texts", n2g_n_latents=3)
    earlier = "1b861e9173c2b93f"  # this build's key as recorded before the draw (the test above)
    assert unkeyed_record([], dataclasses.replace(cfg, sample_pool_tokens=0))["key"] == earlier
    assert unkeyed_record([], cfg)["key"] != earlier
    in_order, drawn = (build_inputs([], dataclasses.replace(cfg, sample_pool_tokens=n))
                       for n in (0, cfg.sample_pool_tokens))
    assert "sample_pool_tokens" not in in_order["browse"]  # as recorded before the draw
    assert what_differs(in_order, drawn) == f"other settings (browse.sample_pool_tokens 0 -> {cfg.sample_pool_tokens})"
    assert what_differs(drawn, in_order) == f"other settings (browse.sample_pool_tokens {cfg.sample_pool_tokens} -> 0)"


def test_saes_whose_folders_share_a_name_are_named_apart(tiny_gpt2, corpus, tmp_path):
    """Two SAEs from folders of one name (runs/a/run and runs/b/run, run1/sae and run2/sae) were both named by it
    and refused; they are named by the nearest parent folders where their paths differ, each with its own pages
    and families. One SAE, or SAEs of other names, keep their folder's name; the same SAE given twice is refused,
    naming both, before the model loads."""
    from saelab.errors import ConfigError
    from saelab.explore.browser.make import open_sources

    save_sae(trained_like_sae(tiny_gpt2, 64, 0, corpus), tmp_path / "a" / "x" / "run" / "sae")
    save_sae(trained_like_sae(tiny_gpt2, 128, 1, corpus), tmp_path / "b" / "x" / "run" / "sae")
    runs = [tmp_path / "a" / "x" / "run", tmp_path / "b" / "x" / "run"]
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL, n_top=4, n_samples=4, lm_batch_size=8)
    manifest = build_browser(runs, tmp_path / "site", cfg, lm=tiny_gpt2, progress=False)
    assert [s["name"] for s in manifest["saes"]] == ["a-run", "b-run"]
    for name, n in (("a-run", 64), ("b-run", 128)):
        key, index = read_js(tmp_path / "site" / "data" / name / "index.js")
        assert key == f"index/{name}" and index["n_latents"] == n
    families = json.loads((tmp_path / "site" / "families.json").read_text())
    assert [(link["parent_sae"], link["child_sae"]) for link in families["links"]] == [("a-run", "b-run")]
    # the SAE folders themselves (RUN/sae), nearest parents first; one alone keeps its name
    sources, _ = open_sources([run / "sae" for run in runs])
    assert [s.name for s in sources] == ["a-sae", "b-sae"]
    assert [s.name for s in open_sources([runs[0] / "sae", runs[1]])[0]] == ["sae", "run"]
    with pytest.raises(ConfigError, match=rf"^SAEs {re.escape(str(runs[0]))} and {re.escape(str(runs[0]))}/ share "
                                          r"the name 'run'; expected each SAE once"):
        build_browser([runs[0], f"{runs[0]}/"], tmp_path / "twice", cfg, lm="no-such-model", progress=False)
    assert not (tmp_path / "twice").exists()


def test_a_site_names_local_files_by_their_base_names(tiny_dir, sae_files, tmp_path, tmp_path_factory):
    """site.json and data/meta.js (and families.json) recorded the corpus, the model folder, the N2G file and the
    SAE folders by their paths on this disk, which went with the site wherever it was published. They name them
    by their base names now, as the Neuronpedia export does; the site is still reused by the same build, and a
    corpus of the same name elsewhere is still told from the one read, before the model loads."""
    text = tmp_path / "texts" / "c.txt"
    text.parent.mkdir()
    text.write_text("The cat sat on the mat. " * 400)
    n2g = tmp_path / "expl.json"
    n2g.write_text(json.dumps({"per_latent": [
        {"latent": 3, "patterns": [{"tokens": [" cat"], "anchored": False, "value": 0.5, "count": 2}]}]}))
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=str(text), model=str(tiny_dir), n_top=4, n_samples=4, lm_batch_size=8)
    both, out = [sae_files / "run_small", sae_files / "saelens_large"], tmp_path / "site"
    build_browser(both, out, cfg, progress=False)
    one = tmp_path / "one"
    build_browser([sae_files / "run_small"], one, dataclasses.replace(cfg, n2g_file=str(n2g)), progress=False)
    local = {str(tmp_path_factory.getbasetemp()), str(tmp_path_factory.getbasetemp().resolve())}
    for site in (out, one):
        for path in sorted(p for p in site.rglob("*") if p.is_file()):
            text_of = path.read_text(encoding="utf-8")
            assert not [d for d in local if d in text_of], f"{path} holds a local path"
    manifest = read_site_manifest(one)
    assert read_js(one / "data" / "meta.js")[1] == {k: v for k, v in manifest.items() if k != "files"}
    assert (manifest["corpus"], manifest["model"], manifest["saes"][0]["source"]) == ("c.txt", "tiny-gpt2", "run_small")
    assert {k: manifest["config"][k] for k in ("corpus", "model", "n2g_file")} == \
           {k: manifest["inputs"]["browse"][k] for k in ("corpus", "model", "n2g_file")} == \
           {"corpus": "c.txt", "model": "tiny-gpt2", "n2g_file": "expl.json"}
    assert [s["source"] for s in json.loads((out / "families.json").read_text())["saes"]] == ["run_small",
                                                                                              "saelens_large"]
    # the same build is reused; a corpus of the same name elsewhere is refused as the other text it is
    assert build_browser(both, out, cfg, lm="no-such-model", progress=False)["reused"]
    other = tmp_path / "elsewhere" / "c.txt"
    other.parent.mkdir()
    other.write_text("Numbers 12 34 56 and 78 follow. " * 400)
    with pytest.raises(RunExistsError, match=rf"built from other corpus text \(browse.corpus {re.escape(str(other))} "
                                             r"is another corpus of that name, not the one read then\)"):
        build_browser(both, out, dataclasses.replace(cfg, corpus=str(other)), lm="no-such-model", progress=False)


def test_a_families_file_names_local_files_by_their_base_names(tiny_dir, sae_files, tmp_path, tmp_path_factory,
                                                                capsys):
    """`saelab families --out` recorded the model folder, the SAE folders and the corpus by their paths on this
    disk, where the site's copy of the same tree names them by their base names. It does the same now; the same
    command still reuses the file, and a corpus of the same name elsewhere is still told from the one read."""
    from saelab.cli import main

    text = tmp_path / "texts" / "c.txt"
    text.parent.mkdir()
    text.write_text("The cat sat on the mat. " * 400)
    saes = [str(sae_files / "run_small"), str(sae_files / "saelens_large")]
    fam = tmp_path / "families.json"
    args = ["--out", str(fam), "--model", str(tiny_dir), "--n-tokens", str(31 * 8), "--no-progress"]
    assert main(["families", *saes, "--corpus", str(text), *args]) == 0
    written = fam.read_text(encoding="utf-8")
    local = {str(tmp_path_factory.getbasetemp()), str(tmp_path_factory.getbasetemp().resolve())}
    assert not [d for d in local if d in written], "families.json holds a local path"
    tree = json.loads(written)
    assert (tree["model"], [s["source"] for s in tree["saes"]]) == ("tiny-gpt2", ["run_small", "saelens_large"])
    assert re.fullmatch(r"[0-9a-f]{8}:[0-9a-f]{16}", tree["key"])  # keyed by this machine's secret
    assert {k: tree["inputs"]["browse"][k] for k in ("corpus", "model")} == {"corpus": "c.txt", "model": "tiny-gpt2"}
    capsys.readouterr()
    assert main(["families", *saes, "--corpus", str(text), *args]) == 0
    assert json.loads(capsys.readouterr().out)["reused"]
    other = tmp_path / "elsewhere" / "c.txt"
    other.parent.mkdir()
    other.write_text("Numbers 12 34 56 and 78 follow. " * 400)
    assert main(["families", *saes, "--corpus", str(other), *args]) == 2
    assert (f"holds feature families of other corpus text (--corpus {other} is another corpus of that name, not the "
            "one read then)") in capsys.readouterr().err


def test_where_the_corpus_lies_is_recorded_by_a_hash_no_guessed_path_confirms(sae_files, tiny_gpt2, tmp_path,
                                                                              monkeypatch):
    """site.json recorded where the corpus lay as a hash of its absolute path alone: anyone could confirm a guessed
    path from a published site. It is keyed by this machine's secret now; a refusal still tells a corpus changed
    since from another of that name, says it cannot tell for a record made with another secret, and reads the
    path hash (and the plain hashes of the files) of a site an earlier saelab built as it did."""
    from saelab.explore.browser.make import corpus_path_hash, open_sources, unkeyed_record

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "texts" / "c.txt"
    text.parent.mkdir()
    text.write_text("The cat sat on the mat. " * 400)
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=str(text), n_top=4, n_samples=4, lm_batch_size=8)
    out, one = tmp_path / "site", [sae_files / "run_small"]
    build_browser(one, out, cfg, lm=tiny_gpt2, progress=False)
    recorded = (out / "site.json").read_text()
    assert corpus_path_hash(str(text)) not in recorded and "corpus_where" not in recorded
    place = read_site_manifest(out)["inputs"]["corpus_place"]
    assert re.fullmatch(r"[0-9a-f]{8}:[0-9a-f]{16}", place)
    then = unkeyed_record(open_sources(one)[0], cfg)  # as an earlier saelab hashed these files
    text.write_text("Numbers 12 34 56 and 78 follow. " * 400)  # the same place, other text

    def refusal(corpus=text) -> str:
        with pytest.raises(RunExistsError) as e:
            build_browser(one, out, dataclasses.replace(cfg, corpus=str(corpus)), lm="no-such-model", progress=False)
        return re.search(r"built from (.*?)( \(it shows \w+\))?; pass", str(e.value))[1]

    assert refusal() == f"other corpus text (browse.corpus {text} changed since)"
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "another-cache"))  # another machine's or user's secret
    assert refusal() == (f"inputs hashed with another local key or none (another machine's or user's, or "
                         f"{tmp_path / 'another-cache' / 'local-key'} made again since), which cannot be compared")
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    manifest = read_site_manifest(out)  # as an earlier saelab recorded it: the hashes of the paths themselves
    del manifest["inputs"]["corpus_place"]
    (out / "site.json").write_text(json.dumps({**manifest, "key": then["key"], "inputs": {
        **manifest["inputs"], "sae_files": then["sae_files"], "corpus_files": then["corpus_files"],
        "corpus_where": corpus_path_hash(str(text))}}))
    assert refusal() == f"other corpus text (browse.corpus {text} changed since)"
    other = tmp_path / "elsewhere" / "c.txt"
    other.parent.mkdir()
    other.write_text("The cat sat on the mat. " * 400)
    assert refusal(other) == f"other corpus text (browse.corpus {other} is another corpus of that name, not the one " \
                             "read then)"


def test_a_published_site_confirms_no_guessed_path(tiny_dir, sae_files, tmp_path, monkeypatch, capsys):
    """site.json (and data/meta.js) recorded `key`, a plain sha256 over the settings with the --model folder's and
    the corpus's paths and the SAE files' paths, sizes and times, and `inputs.sae_files` / `corpus_files`, plain
    hashes of those files' paths: anyone with the published site could confirm a guessed path. Each is keyed by
    this machine's secret now (recomputed with the true paths under another secret, none matches); the same build
    is still reused, and a site an earlier saelab recorded (its plain key) is built again, recording the keyed one."""
    from saelab.explore.browser import make

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "texts" / "c.txt"
    text.parent.mkdir()
    text.write_text("The cat sat on the mat. " * 400)
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=str(text), model=str(tiny_dir), n_top=4, n_samples=4, lm_batch_size=8)
    one, out = [sae_files / "run_small"], tmp_path / "site"
    build_browser(one, out, cfg, progress=False)
    manifest = read_site_manifest(out)
    sources, _ = make.open_sources(one)
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "another-cache"))  # who guesses: the true paths, no secret
    assert make.build_key(sources, cfg) != manifest["key"], "the published key confirms the local paths"
    theirs = make.build_inputs(sources, cfg)
    assert [theirs[k] == manifest["inputs"][k] for k in ("sae_files", "corpus_files", "corpus_place")] == [False] * 3
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    unkeyed = make.unkeyed_record(sources, cfg, numbers_contexts=True)  # as a site's key hashes it
    published = "".join(p.read_text() for p in out.rglob("*.js*"))
    assert not [v for v in unkeyed.values() if v in published]
    assert build_browser(one, out, cfg, lm="no-such-model", progress=False)["reused"]
    (out / "site.json").write_text(json.dumps({**manifest, "key": unkeyed["key"]}))  # as an earlier saelab keyed it
    capsys.readouterr()
    assert build_browser(one, out, cfg, progress=False)["reused"] is False
    assert read_site_manifest(out)["key"] == manifest["key"]
    assert "building it again to record keyed ones" in capsys.readouterr().err


def test_without_a_local_key_a_build_says_so_and_a_rerun_is_refused_or_served_as_it_is(sae_files, tiny_dir, corpus,
                                                                                       tmp_path, monkeypatch, capsys):
    """Where no local key can be made (SAELAB_CACHE_DIR under a regular file), a site recorded `"key": null` without
    a word, and the same command again was refused, as was `--serve` of it: "build, then serve" did not work. The
    build now says a rerun will not recognise it; the rerun's refusal names why and --serve, which serves the site as
    it is (its files are checked as served) with a warning; other settings, or a damaged site, are still refused."""
    from saelab.cli import main

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    why = f"{tmp_path / 'afile' / 'cache' / 'local-key'} cannot be read or made (Not a directory)"
    out, port = tmp_path / "site", free_port()
    monkeypatch.chdir(tiny_dir.parent)  # the model folder by the name the SAEs record: no note of another model
    browse = ["browse", str(sae_files / "run_small"), "--out", str(out), "--model", tiny_dir.name, "--corpus", corpus,
              "--sample-pool-tokens", str(POOL), "--n-tokens", "1500", "--no-progress"]
    assert main(browse) == 0
    assert capsys.readouterr().err.strip() == (
        f"saelab: note: no local key ({why}): {out} records no key of its inputs, so a rerun will not recognise this "
        "feature browser site as unchanged; set SAELAB_CACHE_DIR to a writable folder to keep a key")
    built = read_site_manifest(out)
    assert built["key"] is None and not [p for p in out.rglob("*.js*") if str(tmp_path) in p.read_text()]
    assert main(browse) == 2
    assert capsys.readouterr().err.strip() == (
        f"saelab browse: error: {out} holds a feature browser site built from inputs that cannot be compared without "
        f"a local key ({why}) (it shows run_small); pass --overwrite to replace it, --serve to serve it as it is, or "
        "pick another --out")
    assert serve_until_a_page_answers([*browse, "--serve", "--port", str(port)], port) == 0
    printed = capsys.readouterr()
    assert f"http://127.0.0.1:{port}/" in printed.out and '"reused": true' in printed.out
    assert printed.err.strip() == (
        f"saelab: warning: {out} holds a feature browser site of these settings and SAE names, built from inputs "
        f"that cannot be compared without a local key ({why}): served as it is; should an SAE or the corpus have "
        "changed since, pass --overwrite to build it again")
    assert read_site_manifest(out) == built  # served, not built again
    assert main([*browse[:-2], "1200", "--no-progress", "--serve", "--port", str(port)]) == 2
    assert ("built from other settings (--n-tokens 1500 -> 1200) (it shows run_small); pass --overwrite to replace "
            "it, or pick") in capsys.readouterr().err
    (out / "data" / "vocab.js").write_text('SAELAB.put("vocab",{});\n')
    assert main([*browse, "--serve", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().endswith("but its data/vocab.js changed since it was written; pass "
                                                    "--overwrite to build it again, or pick another --out")


def test_without_a_local_key_a_families_file_says_so_and_a_rerun_names_why(sae_files, tiny_gpt2, corpus, tmp_path,
                                                                           monkeypatch, capsys):
    """As a site: a families file written where no local key can be made says a rerun will not recognise it, and
    the rerun's refusal says why."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    why = f"{tmp_path / 'afile' / 'cache' / 'local-key'} cannot be read or made (Not a directory)"
    saes, out = [sae_files / "run_small", sae_files / "saelens_large"], tmp_path / "f.json"
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, sample_pool_tokens=POOL, lm_batch_size=8)
    capsys.readouterr()
    assert build_families(saes, out, cfg, lm=tiny_gpt2, progress=False)["key"] is None
    assert capsys.readouterr().err.strip() == (
        f"saelab: note: no local key ({why}): {out} records no key of its inputs, so a rerun will not recognise this "
        "families file as unchanged; set SAELAB_CACHE_DIR to a writable folder to keep a key")
    with pytest.raises(RunExistsError, match=re.escape(f"holds feature families of inputs that cannot be compared "
                                                       f"without a local key ({why}); pass --overwrite")):
        build_families(saes, out, cfg, lm="no-such-model", progress=False)


def test_a_corpus_whose_name_is_not_utf8_is_refused_before_the_model_loads(sae_files, tmp_path, monkeypatch, capsys):
    """`browse RUN --corpus FILE` of a file whose name is not UTF-8 (Linux takes any bytes; Python gives them as
    surrogate escapes) was a UnicodeEncodeError traceback: hashing where it lies, and before that fix at the end,
    writing its name into the site's data after the whole pass. A site or an export records the name as text,
    which cannot hold it: refused in one line naming it, before the model loads."""
    from saelab.cli import main

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    name = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.txt")
    try:
        Path(name).write_text("The cat sat on the mat. " * 400)
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    shown = f"{tmp_path}/caf\\xe9.txt"
    for target in (["--out", str(tmp_path / "site")], ["--export", "neuronpedia", str(tmp_path / "np")]):
        assert main(["browse", str(sae_files / "run_small"), *target, "--corpus", name, "--model", "no-such-model",
                     "--no-progress"]) == 2
        assert capsys.readouterr().err == (f"saelab browse: error: --corpus {shown}: its name is not UTF-8, and the "
                                           "site or export records it as text; rename it, or pass a link to it "
                                           "whose name is UTF-8\n")
    assert not (tmp_path / "site").exists() and not (tmp_path / "np").exists()


def test_latent_pages_are_written_as_built_not_all_held_at_once(tiny_gpt2, corpus, tmp_path):
    """Every latent's page record (its nearest-latent lists above all: n_latents x n_neighbours entries, ~150-176 B
    each as Python lists) was built before the first page file was written: 8,191 on 8,192 latents took 11.8 GB.
    Each page file is written as it is built now: the write's Python memory at its peak stays within a few page
    files' worth, far below that of the 512 x 511 entries listed."""
    import tracemalloc

    from saelab.explore.browser.build import SAESource, collect_statistics, finish_statistics, read_tokens
    from saelab.explore.browser.site import write_site

    sae = trained_like_sae(tiny_gpt2, 512, 2, corpus)
    cfg = BrowseConfig(n_tokens=31 * 16, corpus=corpus, sample_pool_tokens=POOL,
                       n_top=4, n_samples=4, lm_batch_size=16, n_neighbours=511)
    tokens = read_tokens(tiny_gpt2, sae, cfg)
    stats, _, _ = collect_statistics(tiny_gpt2, [SAESource("big", "big", sae)], tokens, cfg, hook=HOOK,
                                     families=False, progress=False)
    finish_statistics(tiny_gpt2, stats[0], tokens, HOOK, cfg, progress=False)
    tracemalloc.start()
    try:
        write_site(tmp_path / "site", manifest={"format": "saelab-feature-browser"}, stats_list=stats,
                   tokens_NT=tokens, tokenizer=tiny_gpt2.tokenizer, cfg=cfg, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    page = 64 * 511 * 170  # one page file's lists (measured at 10 MiB in all; 40 MiB when all pages were held)
    assert peak < 4 * page, f"{peak / 2**20:.1f} MiB at the peak for {512 * 511:,} entries"
    _, records = read_js(tmp_path / "site" / "data" / "big" / "l" / "0007.js")
    assert [len(r["near"]) for r in records] == [511] * 64 and records[-1]["id"] == 511


def test_a_model_given_loaded_keys_the_build_by_its_own_dtype(sae_files, tiny_dir, corpus, tmp_path):
    """The key and record of a site or families file took the dtype asked for (float32 unless given): one built
    with a model given loaded in bfloat16 was keyed as float32, and a float32 build then reused its numbers. They
    take the dtype the model is in, as metrics.json records it."""
    from saelab.models import load_model

    bf16 = load_model(str(tiny_dir), dtype="bfloat16")
    cfg = BrowseConfig(n_tokens=31 * 8, corpus=corpus, n_top=4, n_samples=4, lm_batch_size=8)
    both, out, fam = [sae_files / "run_small", sae_files / "saelens_large"], tmp_path / "site", tmp_path / "fam.json"
    assert build_browser(both[:1], out, cfg, lm=bf16, progress=False)["inputs"]["model_dtype"] == "bfloat16"
    assert build_families(both, fam, cfg, lm=bf16, progress=False)["inputs"]["model_dtype"] == "bfloat16"
    assert build_browser(both[:1], out, cfg, lm=str(tiny_dir), model_dtype="bfloat16", progress=False)["reused"]
    assert build_families(both, fam, cfg, lm=str(tiny_dir), model_dtype="bfloat16", progress=False)["reused"]
    dtypes = r'other settings \(model_dtype "bfloat16" -> "float32"\)'
    with pytest.raises(RunExistsError, match=rf"holds a feature browser site built from {dtypes}"):
        build_browser(both[:1], out, cfg, lm=str(tiny_dir), progress=False)
    with pytest.raises(RunExistsError, match=rf"holds feature families of {dtypes}"):
        build_families(both, fam, cfg, lm=str(tiny_dir), progress=False)
