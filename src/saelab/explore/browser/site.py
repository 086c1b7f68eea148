"""Write the feature browser as a static, self-contained site: local HTML/JS/CSS plus data files.

Layout (every path relative; nothing refers to another host, so the site works offline, over
``saelab browse --serve`` on 127.0.0.1 or opened straight from disk)::

    index.html  app.js  style.css      the viewer (hash routes: #/s/SAE, #/s/SAE/l/ID, #/families)
    site.json                          what was built, from what, with which settings and timings; local
                                       files (corpus, model, N2G file, SAEs) by their base names, never
                                       their paths (the site is meant to be published), its key and
                                       inputs' hashes keyed by this machine's secret (null without
                                       one); ``files``: the
                                       size and hash of every other file, which a rebuild checks before
                                       it reuses the site (:func:`site_damage`)
    families.json                      the family tree (several SAEs only; see .families)
    data/meta.js                       site.json for the viewer (less ``files``)
    data/vocab.js                      {token id: text} for every token the pages show
    data/SAE/index.js                  one row per latent: density, max, mean, the tokens where it reaches
                                       half its max in its top contexts (with counts, up to 12), its 5 most
                                       promoted tokens, its explanation: what the index shows and searches
    data/SAE/l/NNNN.js                 latent pages, CHUNK latents a file (top contexts, quantile bands,
                                       histogram, direct logit effect, nearest latents, family); each example
                                       ``[context number, start, token ids, q]``, the number its context's place
                                       in the corpus's stream of contexts (:mod:`.build`)
    data/families.js                   families.json for the viewer

Data files are JavaScript (``SAELAB.put(key, {...})``) rather than JSON so that ``<script>`` tags
load them also from ``file://``, where ``fetch`` is refused. Their strings (SAE names from folder names,
tokens, explanations) are data to the viewer: app.js escapes them on their way into the page, and
index.html carries :data:`PAGE_CSP` (no inline script or style), which ``saelab browse --serve`` also
sends as a header. Token activations in the pages are
integers ``q`` = round(10,000 * value / the latent's max activation), at least 1 where the latent
is active; the viewer shows ``q * max / 10,000``.

The site is written to a temporary folder beside the target and renamed into place at the end,
so an interrupted build never leaves a folder that looks like a finished site.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, RunExistsError
from saelab.run_folder import refuse_others_files
from saelab.sae.config import SITE_MANIFEST
from saelab.sae.relu import sparsity_of
from saelab.utils.atomic import atomic_folder, write_json
from saelab.utils.file_digests import file_sha256

SITE_FORMAT = "saelab-feature-browser"
SITE_VERSION = 1
CHUNK = 64
"""Latents per data file of latent pages."""
Q_SCALE = 10_000
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = ("index.html", "app.js", "style.css")
SITE_ENTRIES = (*STATIC_FILES, "data", "families.json", SITE_MANIFEST)
"""What write_site puts in a site's folder; anything else there is the user's, kept from --overwrite."""
FILES = "files"
"""site.json's record of the site's other files, ``{path: [size, sha256 (16 hex digits)]}``."""
PAGE_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'"
"""The Content-Security-Policy in index.html's ``<meta http-equiv>`` (so it holds from ``file://`` too):
scripts, styles and data only from the site itself, nothing inline; ``data:`` images for the blank favicon."""
_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import\s+["']?(?:https?:)?//|"""
                       r"""(?:fetch|import)\(\s*["'](?:https?:)?//""", re.I)


def external_references(folder: str | os.PathLike) -> list[str]:
    """Places in the site's HTML/JS/CSS that would load something from another host (should be none)."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix not in (".html", ".js", ".css") or not path.is_file():
            continue
        if path.parent.name == "l" or path.name in ("vocab.js", "index.js"):
            continue  # data files: token texts may legitimately contain "http://"
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(folder)}: {m.group(0)!r}" for m in _EXTERNAL.finditer(text)]
    return found


def read_site_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``site.json`` of a finished site, or None."""
    return read_own_json(Path(folder) / SITE_MANIFEST, SITE_FORMAT)


def site_damage(folder: str | os.PathLike, manifest: dict[str, Any]) -> str | None:
    """What of the finished site at ``folder`` (``manifest``: its site.json) is not as it was written: "its
    data/meta.js is missing", "its families.json changed since it was written" (another command wrote over it), or
    None. A site.json from before it recorded the files (:data:`FILES`) is checked for the files its SAEs and
    families imply."""
    folder = Path(folder)
    recorded = manifest.get(FILES)
    if not isinstance(recorded, dict):
        implied = implied_files(manifest)
        if implied is None:
            return f"its {SITE_MANIFEST} lists its SAEs as saelab never wrote them"
        recorded = dict.fromkeys(implied)
    for name, record in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"its {name} is missing"
        if record is not None and [path.stat().st_size, file_sha256(path)[:16]] != record:
            return f"its {name} changed since it was written"
    return None


def implied_files(manifest: dict[str, Any]) -> list[str] | None:
    """The files write_site writes for the SAEs and families ``manifest`` names (None: it names them otherwise)."""
    names = [*STATIC_FILES, "data/meta.js", "data/vocab.js"]
    names += ["families.json", "data/families.js"] if manifest.get("has_families") else []
    for sae in manifest.get("saes") or []:
        name, n = (sae.get("name"), sae.get("n_latents")) if isinstance(sae, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(n, int):
            return None
        names += [f"data/{name}/index.js", *(f"data/{name}/l/{c:04d}.js" for c in range(-(-n // CHUNK)))]
    return names


def _file_record(folder: Path) -> dict[str, list]:
    """:data:`FILES` of the site being written in ``folder`` (every file but site.json)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / SITE_MANIFEST)
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, file_sha256(p)[:16]] for p in paths}


def read_own_json(path: str | os.PathLike, file_format: str) -> dict[str, Any] | None:
    """A JSON file saelab wrote with ``"format": file_format``, or None (absent, unreadable or another file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == file_format else None


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{float(x):.{digits}g}")


def _js(key: str, obj: Any) -> str:
    text = f"SAELAB.put({json.dumps(key)},{json.dumps(obj, separators=(',', ':'), ensure_ascii=False)});\n"
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")  # line breaks to pre-2019 JS parsers


def _check_name(name: str) -> None:
    """An SAE's name becomes a folder of the site: one plain path component, nothing that climbs out."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"SAE name {name!r}: expected a name usable as one folder name (not empty, '.' or '..', "
                          "no '/', '\\' or NUL); rename the run folder or file")


class _Vocab:
    def __init__(self, tokenizer) -> None:
        from saelab.evals.probe_tasks import token_strings

        self.tokenizer, self.token_strings = tokenizer, token_strings
        self.used: set[int] = set()

    def add(self, ids) -> None:
        self.used.update(int(i) for i in ids)

    def strings(self) -> dict[str, str]:
        ids = sorted(self.used)
        cache: dict[int, str] = {}
        return {str(i): s for i, s in zip(ids, self.token_strings(self.tokenizer, ids, cache, readable_bytes=True))}


def _examples(tokens_np: np.ndarray, place_N: np.ndarray, ctx_K: np.ndarray, pos_K: np.ndarray, rows_KT: np.ndarray,
              scale: float, s0: int, before: int, after: int, vocab: _Vocab) -> list[list]:
    """``[context number, start, token ids, q activations]`` for each filled entry (window around the max); an
    entry's context is a row of ``tokens_np``, numbered by its place in the corpus (``place_N``)."""
    T = tokens_np.shape[1]
    out = []
    for c, p, row in zip(ctx_K.tolist(), pos_K.tolist(), rows_KT):
        if c < 0:
            continue
        start, end = max(s0, p - before), min(T, p + after + 1)
        ids = tokens_np[c, start:end].tolist()
        r = row[start:end]
        q = np.where(r > 0, np.maximum(1, np.rint(r / scale * Q_SCALE)), 0).astype(np.int64).tolist() if scale > 0 else [0] * len(ids)
        vocab.add(ids)
        out.append([int(place_N[c]), start, ids, q])
    return out


def _strong_tokens(tokens_np: np.ndarray, ctx_K: np.ndarray, rows_KT: np.ndarray, scale: float, s0: int,
                   limit: int = 12) -> list[list[int]]:
    """``[token id, count]`` of the tokens where the latent reaches half its max in its top contexts, most first."""
    ok = ctx_K >= 0
    if scale <= 0 or not ok.any():
        return []
    toks = tokens_np[ctx_K[ok]][:, s0:]
    strong = rows_KT[ok][:, s0:] >= 0.5 * scale
    ids, counts = np.unique(toks[strong], return_counts=True)
    order = np.lexsort((ids, -counts))[:limit]
    return [[int(ids[j]), int(counts[j])] for j in order]


def latent_pages(stats, tokens_NT: torch.Tensor, cfg, vocab: _Vocab, families: dict[str, Any] | None,
                 name: str, context_index: torch.Tensor | None = None
                 ) -> tuple[dict[str, Any], Iterator[list[dict[str, Any]]]]:
    """The index of one SAE and its per-latent records, CHUNK latents (one page file) at a time (see the module
    docstring). Each chunk is built as it is read, so the records of all latents (their nearest-latent lists
    above all: n_latents x n_neighbours entries) are never held at once; the index's rows fill as the chunks are
    read, and the index is whole once the last one is. ``context_index``: each row's place in the corpus's stream
    of contexts (``DrawnContexts.index``), the number its examples record; None: the rows are in the corpus's order."""
    sae = stats.source.sae
    place = torch.arange(tokens_NT.shape[0]) if context_index is None else context_index
    arrays = {"tokens": tokens_NT.numpy(), "place": place.numpy(), "max": stats.max_N.numpy(),
              "top_ctx": stats.top_ctx_NK.numpy(),
              "top_pos": stats.top_pos_NK.numpy(), "top_rows": stats.top_rows_NKT.numpy(),
              "smp_ctx": stats.sample_ctx_NS.numpy(), "smp_pos": stats.sample_pos_NS.numpy(),
              "smp_max": stats.sample_act_NS.numpy(), "smp_rows": stats.sample_rows_NST.numpy(),
              "hist": stats.hist_NH.numpy(), "hist_top": stats.hist_top_N.numpy(), "count": stats.count_N,
              "near_ids": stats.neighbours["ids"].numpy(), "near_cos": stats.neighbours["cos"].numpy(),
              "density": stats.density_N.numpy(), "mean": stats.mean_N.numpy(),
              **{f"lg_{k}": v.numpy() for k, v in stats.logits.items()}}
    index = {"name": name, "n_latents": sae.n_latents, **sparsity_of(sae), "n_tokens": stats.n_tokens,
             "chunk": CHUNK, "density": [], "max": [], "mean": [], "top_tokens": [], "promoted": [], "expl": []}
    fam = _family_lookup(families, name)
    s0 = 1 if sae.cfg.prepend_bos else 0

    def chunks() -> Iterator[list[dict[str, Any]]]:
        for start in range(0, sae.n_latents, CHUNK):
            yield [_latent_record(arrays, i, s0, cfg, vocab, stats.explanations.get(i), fam(i), index)
                   for i in range(start, min(start + CHUNK, sae.n_latents))]

    return index, chunks()


def _latent_record(a: dict[str, Any], i: int, s0: int, cfg, vocab: _Vocab, expl: dict[str, Any] | None,
                   family: dict[str, Any] | None, index: dict[str, Any]) -> dict[str, Any]:
    """Latent i's page record (arrays ``a`` from :func:`latent_pages`), its row appended to ``index``."""
    tokens_np, scale = a["tokens"], float(a["max"][i])
    top = _examples(tokens_np, a["place"], a["top_ctx"][i], a["top_pos"][i], a["top_rows"][i], scale, s0,
                    cfg.window_before, cfg.window_after, vocab)
    valid = a["smp_ctx"][i] >= 0
    order = np.argsort(a["smp_max"][i][valid], kind="stable")
    samples = _examples(tokens_np, a["place"], a["smp_ctx"][i][valid][order], a["smp_pos"][i][valid][order],
                        a["smp_rows"][i][valid][order], scale, s0, cfg.window_before, cfg.window_after, vocab)
    bands = [b.tolist() for b in np.array_split(np.arange(len(samples)), cfg.n_bands)] if samples else []
    counts = a["hist"][i]
    nz = np.flatnonzero(counts)
    hist_rec = [_sig(a["hist_top"][i]), counts[: nz[-1] + 1].tolist() if nz.size else []]
    top_tok = _strong_tokens(tokens_np, a["top_ctx"][i], a["top_rows"][i], scale, s0)
    vocab.add(t for t, _ in top_tok)
    vocab.add(a["lg_pos_ids"][i].tolist())
    vocab.add(a["lg_neg_ids"][i].tolist())
    density, mean = _sig(a["density"][i]), _sig(a["mean"][i])
    for key, value in (("density", density), ("max", _sig(scale)), ("mean", mean), ("top_tokens", top_tok),
                       ("promoted", [int(t) for t in a["lg_pos_ids"][i][:5]]), ("expl", expl["text"] if expl else "")):
        index[key].append(value)
    return {
        "id": i, "max": _sig(scale), "density": density, "mean": mean,
        "count": int(a["count"][i]), "top": top, "samples": samples, "bands": bands, "hist": hist_rec,
        "pos": [[int(t), _sig(v, 3)] for t, v in zip(a["lg_pos_ids"][i], a["lg_pos_vals"][i])],
        "neg": [[int(t), _sig(v, 3)] for t, v in zip(a["lg_neg_ids"][i], a["lg_neg_vals"][i])],
        "near": [[int(j), _sig(c, 3)] for j, c in zip(a["near_ids"][i], a["near_cos"][i])],
        "expl": expl, "family": family,
    }


def _family_lookup(families: dict[str, Any] | None, name: str):
    """latent -> {parent: [...] | None, children: [...]} for SAE ``name`` from a families JSON."""
    if not families:
        return lambda i: None
    parents: dict[int, list] = {}
    children: dict[int, list] = {}
    for link in families["links"]:
        for c in link["children"]:
            if link["child_sae"] == name:
                parents[c["child"]] = [link["parent_sae"], c["parent"], c["score"], c["cos"], c["containment"]]
            if link["parent_sae"] == name:
                children.setdefault(c["parent"], []).append(
                    [link["child_sae"], c["child"], c["score"], c["cos"], c["share"]])
    return lambda i: {"parent": parents.get(i), "children": sorted(children.get(i, []), key=lambda r: -r[4])}


def write_site(out: str | os.PathLike, *, manifest: dict[str, Any], stats_list: Sequence, tokens_NT: torch.Tensor,
               tokenizer, cfg, families: dict[str, Any] | None = None, progress: bool = True,
               context_index: torch.Tensor | None = None) -> Path:
    """Write the site for ``stats_list`` (one :class:`~.build.LatentStats` per SAE) to ``out``, atomically;
    ``context_index``: as :func:`latent_pages` takes it.

    An earlier site at ``out`` is replaced; any other non-empty folder there is refused."""
    from tqdm.auto import tqdm

    out = Path(out)
    check_site_target(out)
    with atomic_folder(out) as tmp:
        for f in STATIC_FILES:
            shutil.copyfile(STATIC_DIR / f, tmp / f)
        data = tmp / "data"
        data.mkdir()
        vocab = _Vocab(tokenizer)
        for stats in tqdm(stats_list, desc="site", disable=not progress or len(stats_list) < 2):
            name = stats.source.name
            _check_name(name)
            index, chunks = latent_pages(stats, tokens_NT, cfg, vocab, families, name, context_index)
            (data / name / "l").mkdir(parents=True)
            for c, records in enumerate(chunks):  # each page file written as it is built, then let go
                (data / name / "l" / f"{c:04d}.js").write_text(_js(f"latents/{name}/{c}", records), encoding="utf-8")
            (data / name / "index.js").write_text(_js(f"index/{name}", index), encoding="utf-8")  # whole by now
        (data / "vocab.js").write_text(_js("vocab", vocab.strings()), encoding="utf-8")
        if families:
            write_json(tmp / "families.json", families)
            (data / "families.js").write_text(_js("families", families), encoding="utf-8")
        (data / "meta.js").write_text(_js("meta", manifest), encoding="utf-8")
        # last: its presence marks a finished site, whose files it records as they are now
        write_json(tmp / SITE_MANIFEST, {**manifest, FILES: _file_record(tmp)})
    return out


def refuse_a_site_file(path: str | os.PathLike, named: str) -> None:
    """Refuse, as the file of another result, a feature browser site's own file (its families.json, site.json,
    data/): written over, the site no longer matches its site.json, and a rebuild refuses it."""
    path = Path(path).resolve()
    site = next((folder for folder in path.parents if read_site_manifest(folder) is not None), None)
    if site is not None and path.relative_to(site).parts[0] in SITE_ENTRIES:
        own = path.relative_to(site).as_posix()
        in_data = path.relative_to(site).parts[0] == "data"
        what = "rewrites its data/ folder whole" if in_data and not path.exists() else f"writes its own {own} there"
        raise ConfigError(f"{named} {path}: the feature browser site {site} {what}; pick a file outside the site")


def check_site_target(out: Path) -> None:
    """Refuse to replace anything but a feature browser site (or an empty folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunExistsError(f"{out}: exists and is not a folder; choose another --out")
    site = read_site_manifest(out) is not None
    if not site and any(out.iterdir()):
        raise RunExistsError(f"{out}: folder exists, is not empty and is not a saelab feature browser site; "
                             "choose another --out (it is never deleted)")
    if site:
        refuse_others_files(out, lambda name: name in SITE_ENTRIES, "a feature browser site", "--out")
