"""Verified downloads of OpenAI v5 checkpoints (``saelab eval URL``), against a real HTTP server on 127.0.0.1.

The server serves a real small file in OpenAI's layout, the same file cut short (announced length and
actual length disagree, and a file that is itself truncated), an HTML error page with status 200, and
redirects. Plain http is allowed explicitly in these tests; the default refuses it.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import shutil
import struct
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError
from saelab.sae import load_sae
from saelab.sae.io import cache_path, download, load_url
from test_sae_io import D, N, openai_reference, openai_state_dict  # shared with the format tests

RELEASE = "/sparse-autoencoder/gpt2-small/resid_delta_mlp_v5_32k/autoencoders/7.pt"


class Server:
    """A threaded HTTP server on 127.0.0.1 with fixed routes; counts the requests per path."""

    def __init__(self, good: bytes):
        self.good = good
        self.hits: Counter[str] = Counter()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits[self.path] += 1
                outer.route(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def route(self, h):
        kind = h.path.split("/")[1]
        if kind == "good":
            return self.send(h, self.good)
        if kind == "short-body":  # announces the whole file, sends half, closes
            h.send_response(200)
            h.send_header("Content-Length", str(len(self.good)))
            h.end_headers()
            h.wfile.write(self.good[: len(self.good) // 2])
            h.close_connection = True
            return None
        if kind == "truncated":  # a file that is itself cut short, served consistently
            return self.send(h, self.good[: len(self.good) // 2])
        if kind in ("md5-good", "md5-flipped"):  # Azure Blob Storage's header: base64 of the stored MD5
            body = self.good if kind == "md5-good" else flip_weight_byte(self.good)
            md5 = base64.b64encode(hashlib.md5(self.good).digest()).decode()
            return self.send(h, body, headers={"Content-MD5": md5})
        if kind == "html":
            return self.send(h, b"<html><body>503 Service Unavailable</body></html>", "text/html")
        if kind in ("to-https", "to-same"):
            scheme = "https" if kind == "to-https" else "http"
            h.send_response(302)
            h.send_header("Location", f"{scheme}://127.0.0.1:{self.httpd.server_port}/good{RELEASE}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        h.send_error(404)
        return None

    @staticmethod
    def send(h, body: bytes, ctype: str = "application/octet-stream", headers: dict[str, str] | None = None):
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def flip_weight_byte(good: bytes) -> bytes:
    """The file with one byte of a tensor's stored data changed: it still parses."""
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # The data start after the record's 30-byte local header, its name and its extra field.
    name_len, extra_len = struct.unpack("<HH", good[record.header_offset + 26:record.header_offset + 30])
    at = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    return good[:at] + bytes([good[at] ^ 0x40]) + good[at + 1:]


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    sd = openai_state_dict()
    torch.save(sd, tmp_path / "7.pt")
    server = Server((tmp_path / "7.pt").read_bytes())
    server.state_dict = sd
    yield server
    server.stop()


def cached_files(tmp_path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_download_is_verified_cached_and_loaded(served, tmp_path):
    url = f"{served.base}/good{RELEASE}"
    sae = load_sae(url, allow_http=True)
    assert sae.cfg.hook_name == "blocks.7.hook_mlp_out" and sae.cfg.extra["source"]["url"] == url
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(sae(x), openai_reference(served.state_dict, x)[0], atol=1e-5, rtol=1e-5)
    assert cached_files(tmp_path) == [cache_path(url, allow_http=True)]
    served.stop()  # from here on only the cache can answer
    assert torch.equal(load_sae(url, allow_http=True).W_dec, sae.W_dec)
    assert served.hits[f"/good{RELEASE}"] == 1


def test_plain_http_is_refused_without_allow_http(served, tmp_path):
    url = f"{served.base}/good{RELEASE}"
    with pytest.raises(CheckpointError, match=r"only https:// URLs.*allow_http=True"):
        load_sae(url)
    assert not served.hits, "refused URLs must not be fetched at all"
    with pytest.raises(CheckpointError, match="only https://"):
        load_sae("ftp://127.0.0.1/x/7.pt")


def test_scheme_is_part_of_the_cache_key(served, tmp_path):
    url = f"{served.base}/good{RELEASE}"
    download(url, allow_http=True)
    https_url = url.replace("http://", "https://", 1)
    assert cache_path(https_url) != cache_path(url, allow_http=True)
    # The http copy must not answer for https: the https fetch itself is attempted (and fails here).
    with pytest.raises(CheckpointError, match="download failed"):
        load_sae(https_url)


@pytest.mark.parametrize("route,message", [
    ("short-body", "download stopped after"),
    ("truncated", "not a readable checkpoint"),
    ("html", "not a readable checkpoint"),
])
def test_bad_downloads_never_enter_the_cache(served, tmp_path, route, message):
    url = f"{served.base}/{route}{RELEASE}"
    for _ in range(2):  # the second attempt fetches again: nothing was cached
        with pytest.raises(CheckpointError, match=message) as err:
            load_sae(url, allow_http=True)
        assert url in str(err.value)
    assert served.hits[f"/{route}{RELEASE}"] == 2
    assert cached_files(tmp_path) == [], "a bad download was left in the cache"


def test_server_md5_is_checked(served, tmp_path):
    flipped_url = f"{served.base}/md5-flipped{RELEASE}"
    (tmp_path / "flipped.pt").write_bytes(flip_weight_byte(served.good))
    parsed = torch.load(tmp_path / "flipped.pt", weights_only=True)  # parsing alone would let it in
    assert any(not torch.equal(parsed[k], v) for k, v in served.state_dict.items() if isinstance(v, torch.Tensor))
    with pytest.raises(CheckpointError, match="does not match the server's Content-MD5") as err:
        download(flipped_url, allow_http=True)
    assert flipped_url in str(err.value) and cached_files(tmp_path) == []
    good_url = f"{served.base}/md5-good{RELEASE}"
    assert download(good_url, allow_http=True).read_bytes() == served.good


def test_redirect_to_another_scheme_is_refused(served, tmp_path):
    with pytest.raises(CheckpointError, match="redirected to another scheme"):
        load_sae(f"{served.base}/to-https{RELEASE}", allow_http=True)
    assert served.hits[f"/good{RELEASE}"] == 0
    sae = load_sae(f"{served.base}/to-same{RELEASE}", allow_http=True)  # same scheme: followed
    assert sae.cfg.n_latents == N and served.hits[f"/good{RELEASE}"] == 1


def test_pinned_sha256(served, tmp_path):
    url = f"{served.base}/good{RELEASE}"
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        download(url, allow_http=True, sha256="0" * 64)
    assert cached_files(tmp_path) == []
    digest = hashlib.sha256(served.good).hexdigest()
    assert download(url, allow_http=True, sha256=digest).read_bytes() == served.good


def test_damaged_cached_copy_is_fetched_again_once(served, tmp_path):
    url = f"{served.base}/good{RELEASE}"
    path = download(url, allow_http=True)
    path.write_bytes(path.read_bytes()[:100])  # damaged on disk after it was cached
    sae = load_url(url, allow_http=True)
    assert sae.cfg.n_latents == N and served.hits[f"/good{RELEASE}"] == 2
    assert path.read_bytes() == served.good
    path.write_bytes(b"junk")
    served.stop()
    with pytest.raises(CheckpointError, match="download failed") as err:
        load_url(url, allow_http=True)
    assert str(path) in str(err.value)  # names the cached file to replace or delete


def test_unreachable_host_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    url = "https://127.0.0.1:9/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/8.pt"
    with pytest.raises(CheckpointError, match="download failed") as err:
        load_sae(url)
    assert url in str(err.value)
    assert cached_files(tmp_path) == []


def test_url_must_name_a_pt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="only OpenAI sparse_autoencoder .pt files"):
        load_sae("https://127.0.0.1:9/some/folder/cfg.json")
    with pytest.raises(CheckpointError, match="not a downloadable checkpoint URL"):
        load_sae("https://127.0.0.1:9/a/../../etc/x.pt")


@pytest.mark.parametrize("verb, extra", [
    ("eval", ["--out", "ev"]), ("steer", ["--latent", "1", "--value", "1"]), ("top", ["--latent", "1"]),
    ("browse", ["--out", "site"]), ("families", ["OTHER", "--out", "f.json"]), ("export", ["out", "--format", "saelens"])])
def test_every_sae_verb_takes_the_allow_http_its_refusal_names(verb, extra, served, tmp_path, capsys, monkeypatch):
    """The refusal of a plain http URL says to pass --allow-http, which only eval and export accepted: steer, top,
    browse and families answered 'unrecognized arguments: --allow-http'. Every verb that takes an SAE now has it,
    and with it the SAE is downloaded (what fails after that, offline, is the model's load)."""
    from saelab.cli import main

    monkeypatch.chdir(tmp_path)
    url = f"{served.base}/good{RELEASE}"
    argv = [verb, url, *(f"{served.base}/other{RELEASE}" if a == "OTHER" else a for a in extra)]
    assert main(argv) == 2
    assert "plain http needs --allow-http" in capsys.readouterr().err and not served.hits
    main([*argv, "--allow-http"])
    assert "unrecognized arguments" not in capsys.readouterr().err
    assert served.hits[f"/good{RELEASE}"] == 1


def test_python_entry_points_that_load_an_sae_take_allow_http(served, tmp_path):
    """top_activations, latent_max_activation and evaluate load an SAE given as a URL, and the loader's refusal of an
    http URL names allow_http=True, which they did not take. With it the SAE is downloaded (what fails after that,
    offline, is the model's load)."""
    from saelab.explore import latent_max_activation, top_activations
    from saelab.pipeline import evaluate

    url = f"{served.base}/good{RELEASE}"
    for call in (top_activations, latent_max_activation, evaluate):
        with pytest.raises(CheckpointError, match=r"plain http needs allow_http=True"):
            call(url)
        assert not served.hits
        with pytest.raises(Exception) as err:
            call(url, allow_http=True)
        assert "plain http" not in str(err.value) and served.hits[f"/good{RELEASE}"] == 1, err.value
        served.hits.clear()
        shutil.rmtree(tmp_path / "cache")  # the next call downloads again
