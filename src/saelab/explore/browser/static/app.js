// saelab feature browser: a static viewer over data/*.js files (see saelab/explore/browser/site.py).
// Data files call SAELAB.put(key, value); they are loaded with <script> tags so that the site also
// works when opened from disk. Routes: #/s/SAE (index, ?q= search, ?sort=&dir=&page=),
// #/s/SAE/l/ID (latent page), #/families (?focus=SAE:ID), #/about.
//
// Untrusted input: the URL hash (anyone can send a link) and the data (SAE names come from folder names,
// tokens and explanations from text). Every route and parameter is checked against what the site holds
// before use, and every page is built with the html`...` template below, which escapes everything it
// interpolates unless it is itself html`...`: a string from the hash or the data never becomes markup.
// The pages carry a Content-Security-Policy without inline script or style, so styles set from data go
// through the CSSOM (applyStyles) and no attribute holds a handler.
"use strict";

const SAELAB = (() => {
  const store = {}, waiting = {}, loading = {};
  return {
    put(key, value) { store[key] = value; (waiting[key] || []).forEach(f => f(value)); delete waiting[key]; },
    get: key => store[key],
    load(key, src) {
      if (key in store) return Promise.resolve(store[key]);
      if (loading[key]) return loading[key];
      loading[key] = new Promise((resolve, reject) => {
        (waiting[key] = waiting[key] || []).push(resolve);
        const s = document.createElement("script");
        s.src = src;
        s.onerror = () => { delete loading[key]; reject(new Error("cannot load " + src)); };
        document.head.appendChild(s);
      });
      return loading[key];
    },
  };
})();
window.SAELAB = SAELAB;

const $ = sel => document.querySelector(sel);
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

// Markup built by html`...`; anything else interpolated into it is escaped (arrays are joined, null is empty).
class Html { constructor(s) { this.s = s; } toString() { return this.s; } }
const piece = v => v instanceof Html ? v.s : Array.isArray(v) ? v.map(piece).join("") : v === null || v === undefined || v === false ? "" : esc(v);
const html = (strings, ...vals) => new Html(strings.reduce((out, s, i) => out + s + (i < vals.length ? piece(vals[i]) : ""), ""));

// The only way markup enters the document: escaped html`...`, then the styles the policy keeps out of attributes.
function render(el, content) {
  if (!(content instanceof Html)) throw new TypeError("render() takes html`...` only");
  el.innerHTML = content.s;
  el.querySelectorAll("[data-alpha]").forEach(e => { e.style.background = `rgba(var(--hl),${+e.dataset.alpha})`; });
  el.querySelectorAll("[data-width]").forEach(e => { e.style.width = `${+e.dataset.width}%`; });
}
const Q_SCALE = 10000;
let META = null, VOCAB = null;

function fmt(x, d = 3) {
  if (x === null || x === undefined || typeof x === "boolean") return "–";
  x = Number(x);  // data files hold numbers here; anything else shows as "–"
  if (Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1000) return x.toFixed(0);
  if (a < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(d)).toString();
}
// "1 latent matches", "2 latents match": a count with the singular or plural words after it
const count = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
function pct(x) {
  x = Number(x);
  if (!x) return "0";
  const p = 100 * x;
  return (p >= 1 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(3) : p.toExponential(1)) + "%";
}
const tokText = id => (VOCAB && VOCAB[id] !== undefined ? VOCAB[id] : "⟨" + id + "⟩");
// control characters but line breaks and tabs (a bell, an escape) show as `saelab top` shows them ("\x07"):
// the page would show nothing for them
const CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/g;
const visible = s => s.replace(CONTROL,
  c => (c === "\r" ? "\\r" : "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0")));
// a token of spaces only is marked, or its chip shows empty; a run of 4 spaces or more (code indentation: "↵"
// and 46 spaces) is counted, "␣×46", or its chip is as wide as the spaces
const showTok = s => {
  const counted = s.replace(/ {4,}/g, run => `␣×${run.length}`);
  return visible(/^ +$/.test(counted) ? counted.replace(/ /g, "␣") : counted).replace(/\n/g, "↵").replace(/\t/g, "⇥");
};
// a chip past 24ch is cut with "…" by the style sheet (.tok): its title holds the whole of it (on every chip:
// wide glyphs, CJK or emoji, are cut at fewer characters)
const tokChip = id => {
  const text = showTok(String(tokText(id)));
  return html`<span class="tok" title="${text}">${text}</span>`;
};

function decodePart(p) {
  try { return decodeURIComponent(p); } catch (err) { return p; }  // malformed %-escapes: keep the text as it is
}
function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const cut = h.indexOf("?");
  const path = cut < 0 ? h : h.slice(0, cut), query = cut < 0 ? "" : h.slice(cut + 1);
  return {parts: path.split("/").filter(Boolean).map(decodePart), params: new URLSearchParams(query)};
}
function href(parts, params) {
  const q = params && Object.keys(params).length ? "?" + new URLSearchParams(params).toString() : "";
  return "#/" + parts.map(encodeURIComponent).join("/") + q;
}
const saeNames = () => META.saes.map(s => s.name);
const saeInfo = name => META.saes.find(s => s.name === name);
// "k = 32" of a top-k SAE; a ReLU SAE keeps every positive latent: it has no k (its k = n_latents is no top-k)
const sparsity = info => (info.activation === "relu" ? "ReLU" : `k = ${info.k}`);

// ---- what the hash may say: anything else falls back to the default or shows "not found" ------------------

const SORT_KEYS = ["id", "density", "max", "mean", "expl", "match"];
const DIRS = ["asc", "desc"];
const oneOf = (value, allowed, fallback) => (allowed.includes(value) ? value : fallback);
// a non-negative integer below `limit` written in plain digits, else null
const indexBelow = (text, limit) => (/^\d{1,9}$/.test(text || "") && +text < limit ? +text : null);
const pageOf = (text, pages) => indexBelow(text, pages) ?? 0;
// "SAE:ID" of a latent this site has (the SAE name may itself hold ":"), else null
function parseFocus(text) {
  const cut = (text || "").lastIndexOf(":");
  const name = text.slice(0, cut), info = cut > 0 ? saeInfo(name) : undefined;
  const id = info ? indexBelow(text.slice(cut + 1), info.n_latents) : null;
  return id === null ? null : name + ":" + id;
}

const dataUrl = (...parts) => "data/" + parts.map(encodeURIComponent).join("/") + ".js";
async function index(name) { return SAELAB.load("index/" + name, dataUrl(name, "index")); }
async function latent(name, id) {
  const ix = await index(name);
  const c = Math.floor(id / ix.chunk);
  const recs = await SAELAB.load(`latents/${name}/${c}`, dataUrl(name, "l", String(c).padStart(4, "0")));
  return recs[id - c * ix.chunk];
}

function setNav(active) {
  const items = saeNames().map(n => [href(["s", n]), html`${n} <span class="muted small">${saeInfo(n).n_latents}</span>`, "s:" + n]);
  if (META.has_families) items.push([href(["families"]), "Families", "families"]);
  items.push([href(["about"]), "About", "about"]);
  render($("#nav"), html`${items.map(([h, label, key]) => html`<a href="${h}" class="${key === active ? "on" : ""}">${label}</a>`)}`);
}

// ---- index and search ------------------------------------------------------------------------------------

function topTokensHtml(ix, i, n = 3) {
  return html`${ix.top_tokens[i].slice(0, n).map(([t, c]) => html`${tokChip(t)}${c > 1 ? html`<span class="muted small">×${c}</span> ` : ""}`)}`;
}

// Search: a query is split into words; a latent scores when a word equals (or is part of) one of the
// tokens it fires strongly on in its top contexts (at least half its max; up to 12 listed), one of
// the tokens it promotes most, or appears in its explanation. A token that holds part of a character
// of the word (shown as its bytes, escaped) counts as part of the word. A word no latent matches so
// (one the tokenizer splits, "planetarium" = " planet" | "arium") is looked for through its pieces,
// tokens of at least PIECE_MIN characters inside it, in a tier below every whole-word match.
function searchScores(ix, query) {
  const typed = query.split(/\s+/).filter(Boolean);
  const scores = new Float64Array(ix.n_latents);
  typed.forEach(w => {
    const whole = wordScores(ix, w, false);
    const found = whole.some(s => s > 0);
    const add = found ? whole : wordScores(ix, w, true);
    add.forEach((s, i) => { scores[i] += s; });
  });
  return scores;
}

// One typed word's score per latent: as a whole (and part of a token), or (``byPieces``) through its pieces.
function wordScores(ix, typed, byPieces) {
  const w = typed.toLowerCase(), scores = new Float64Array(ix.n_latents);
  const norm = id => String(tokText(id)).trim().toLowerCase();
  // the bytes of the characters as typed (lower case is another character), their escapes lower-cased as x is
  const forms = byteForms(typed).map(f => f.toLowerCase());
  const partOf = x => (w.length > 1 && x.includes(w)) || (BYTE_TOKEN.test(x) && forms.some(f => f.includes(x)));
  const isPiece = x => x.length >= PIECE_MIN && w.includes(x);
  const low = c => 1e-3 * Math.min(c, 100);  // below any whole-word score (the least is 1)
  for (let i = 0; i < ix.n_latents; i++) {
    let s = 0;
    for (const [t, c] of ix.top_tokens[i]) {
      const x = norm(t);
      if (byPieces) s += isPiece(x) ? low(c) : 0;
      else if (x === w) s += 10 * c; else if (partOf(x)) s += 3 * c;
    }
    for (const t of ix.promoted[i]) {
      const x = norm(t);
      if (byPieces) s += isPiece(x) ? low(0.5) : 0;
      else if (x === w) s += 4; else if (partOf(x)) s += 1;
    }
    if (!byPieces && ix.expl[i] && String(ix.expl[i]).toLowerCase().includes(w)) s += 20;
    scores[i] = s;
  }
  return scores;
}

// The shortest token that counts as a piece of a longer word: shorter ones ("an", "s") sit inside most words.
const PIECE_MIN = 3;
// A token holding part of a character shows its bytes escaped: "\xf0\x9f" (byte-level BPE) or "<0xF0>"
// (a SentencePiece byte), lower-cased by the search like all token text.
const BYTE_TOKEN = /\\x[0-9a-f]{2}|<0x[0-9a-f]{2}>/;
// The word with each non-ASCII character written as its UTF-8 bytes, in both forms ([] for ASCII words).
function byteForms(w) {
  if (!/[^\x00-\x7f]/.test(w)) return [];
  const utf8 = new TextEncoder(), hex = b => b.toString(16).padStart(2, "0");
  const form = esc => Array.from(w, ch => (ch.codePointAt(0) < 128 ? ch : Array.from(utf8.encode(ch), b => esc(hex(b))).join(""))).join("");
  return [form(h => "\\x" + h), form(h => "<0x" + h + ">")];
}

function densityPlot(ix) {
  // Histogram of log10(density) over all latents; dead latents counted apart.
  const lo = -7, hi = 0, nb = 35, counts = new Array(nb).fill(0);
  let dead = 0;
  for (const d of ix.density) {
    if (!d) { dead++; continue; }
    const b = Math.min(nb - 1, Math.max(0, Math.floor((Math.log10(d) - lo) / (hi - lo) * nb)));
    counts[b]++;
  }
  const W = 520, H = 110, m = Math.max(1, ...counts), bw = W / nb;
  const bars = counts.map((c, b) => {
    const h = (H - 20) * c / m, x0 = lo + (hi - lo) * b / nb;
    return html`<rect class="b" x="${b * bw + 1}" y="${H - 16 - h}" width="${bw - 2}" height="${h}"><title>10^${x0.toFixed(1)}…: ${c} latents</title></rect>`;
  });
  const ticks = [-7, -6, -5, -4, -3, -2, -1, 0].map(t => html`<text x="${(t - lo) / (hi - lo) * W}" y="${H - 2}" text-anchor="middle">1e${t}</text>`);
  return html`<svg width="${W + 20}" height="${H}" viewBox="-10 0 ${W + 20} ${H}" role="img" aria-label="density histogram">${bars}${ticks}</svg>
    <div class="muted small">log10 density of the ${ix.n_latents - dead} active latents; ${dead} never active on these ${ix.n_tokens.toLocaleString()} tokens</div>`;
}

// The query is shown through textContent only (after render), never as markup.
function showQuery(q) { document.querySelectorAll(".query").forEach(el => { el.textContent = q; }); }

function pagerHtml(page, pages, link) {
  if (pages <= 1) return "";
  return html`<div class="pager">${page > 0 ? html`<a href="${link(page - 1)}">← prev</a>` : ""}
      <span>page ${page + 1} of ${pages}</span>
      ${page + 1 < pages ? html`<a href="${link(page + 1)}">next →</a>` : ""}</div>`;
}

function sortedLatents(ix, q, sort, dir) {
  let ids = [...Array(ix.n_latents).keys()];
  let scores = null;
  if (q) { scores = searchScores(ix, q); ids = ids.filter(i => scores[i] > 0); }
  const key = {
    id: i => i, density: i => ix.density[i], max: i => ix.max[i], mean: i => ix.mean[i],
    expl: i => ix.expl[i] || "", match: i => (scores ? scores[i] : 0) * 1e6 + ix.max[i],
  }[sort];
  // latents without an explanation go last either way: a page of blanks first hid the explained ones
  const unexplained = i => sort === "expl" && !ix.expl[i];
  ids.sort((a, b) => {
    if (unexplained(a) !== unexplained(b)) return unexplained(a) ? 1 : -1;
    const x = key(a), y = key(b); const c = x < y ? -1 : x > y ? 1 : a - b; return dir === "asc" ? c : -c;
  });
  return ids;
}

async function showIndex(name, params) {
  setNav("s:" + name);
  const ix = await index(name);
  const q = params.get("q") || "";
  const m = q.trim().match(/^#?(\d{1,9})$/);
  if (m && +m[1] < ix.n_latents) { location.hash = href(["s", name, "l", m[1]]); return; }
  const sort = oneOf(params.get("sort"), SORT_KEYS, q ? "match" : "max"), dir = oneOf(params.get("dir"), DIRS, "desc");
  const ids = sortedLatents(ix, q, sort, dir), per = 100;
  const pages = Math.max(1, Math.ceil(ids.length / per)), page = pageOf(params.get("page"), pages);
  const shown = ids.slice(page * per, (page + 1) * per);
  const info = saeInfo(name);
  const withQ = extra => Object.assign({}, q ? {q} : {}, extra);
  const link = s => href(["s", name], withQ({sort: s, dir: s === sort && dir === "desc" ? "asc" : "desc"}));
  const th = (s, label) => html`<th class="sort ${s === sort ? "on " + dir : ""}" data-sort="${s}"><a href="${link(s)}">${label}</a></th>`;
  const pager = pagerHtml(page, pages, p => href(["s", name], withQ({sort, dir, page: p})));
  render($("#main"), html`
    <h1>${name} <span class="muted small">${info.n_latents.toLocaleString()} latents, ${sparsity(info)}, ${META.hook} of ${META.model}</span></h1>
    ${q ? html`<p id="results">${count(ids.length, "latent matches", "latents match")} <b class="query"></b> (their top-activating or promoted tokens or pieces of the words, or explanation). <a href="${href(["s", name])}">clear</a></p>`
        : densityPlot(ix)}
    ${pager}
    <table id="latents"><thead><tr>${th("id", "latent")}${th("density", "density")}${th("max", "max act")}${th("mean", "mean act")}
      <th>fires most on</th><th>promotes</th>${th("expl", "explanation")}</tr></thead><tbody>
    ${shown.map(i => html`<tr class="row"><td><a href="${href(["s", name, "l", String(i)])}">#${i}</a></td>
       <td class="num">${pct(ix.density[i])}</td><td class="num">${fmt(ix.max[i])}</td><td class="num">${fmt(ix.mean[i])}</td>
       <td>${topTokensHtml(ix, i)}</td><td>${ix.promoted[i].slice(0, 3).map(tokChip)}</td><td class="small">${ix.expl[i] || ""}</td></tr>`)}
    </tbody></table>${pager}`);
  showQuery(q);
}

// ---- latent page ------------------------------------------------------------------------------------------

function exampleHtml(ex, scale) {
  const [ctx, start, ids, q] = ex;
  let peak = 0, best = -1;
  q.forEach((v, j) => { if (v > peak) { peak = v; best = j; } });
  const spans = ids.map((id, j) => {
    const a = q[j] * scale / Q_SCALE, s = String(tokText(id)), v = visible(s);
    const txt = v.includes("\n") ? v.replace(/\n/g, "↵") + "\n" : v;
    if (!q[j]) return html`<span class="t" data-act="0" data-tok="${showTok(s)}">${txt}</span>`;
    const alpha = (0.08 + 0.92 * q[j] / Q_SCALE).toFixed(3);
    return html`<span class="t act${j === best ? " peak" : ""}" data-alpha="${alpha}" data-act="${fmt(a, 4)}" data-tok="${showTok(s)}">${txt}</span>`;
  });
  return html`<div class="ex" data-ctx="${ctx}"><span class="v">${fmt(peak * scale / Q_SCALE)}</span><span class="text">${spans}</span></div>`;
}

function histogramSvg(rec, nTokens) {
  const [top, counts] = rec.hist;
  if (!counts.length) return html`<p class="muted">never active</p>`;
  const nb = META.config.n_bins, W = 520, H = 130, bw = W / nb;
  const logc = counts.map(c => (c ? Math.log10(c) + 1 : 0)), m = Math.max(...logc, 1);
  const bars = counts.map((c, b) => {
    const h = (H - 22) * logc[b] / m;
    return c ? html`<rect class="b" x="${b * bw}" y="${H - 18 - h}" width="${Math.max(1, bw - 1)}" height="${h}"><title>${fmt(top * b / nb)} – ${fmt(top * (b + 1) / nb)}: ${c.toLocaleString()} tokens</title></rect>` : "";
  });
  const ticks = [0, 0.25, 0.5, 0.75, 1].map(f => html`<text x="${f * W}" y="${H - 3}" text-anchor="middle">${fmt(top * f)}</text>`);
  return html`<svg width="${W + 30}" height="${H}" viewBox="-15 0 ${W + 30} ${H}" role="img" aria-label="activation histogram">${bars}${ticks}</svg>
    <div class="muted small">nonzero activations over ${nTokens.toLocaleString()} tokens (log count); max ${fmt(rec.max, 4)}</div>`;
}

function logitTable(rows, cls) {
  const m = Math.max(...rows.map(r => Math.abs(r[1])), 1e-9);
  return html`<table class="bars">${rows.map(([t, v]) => html`<tr><td>${tokChip(t)}</td><td class="num">${fmt(v)}</td>
    <td class="barcell"><span class="bar ${cls}" data-width="${(100 * Math.abs(v) / m).toFixed(1)}"></span></td></tr>`)}</table>`;
}

async function neighbourRows(name, near) {
  const ix = await index(name);
  return html`${near.map(([j, c]) => html`<tr><td><a href="${href(["s", name, "l", String(j)])}">#${j}</a></td><td class="num">${fmt(c)}</td><td>${topTokensHtml(ix, j)}</td></tr>`)}`;
}

async function familyHtml(name, fam) {
  if (!fam || (!fam.parent && !fam.children.length)) return "";
  const parts = [html`<h2>Family across sizes <a class="small" href="${href(["families"], {focus: name + ":" + fam.self})}">show tree</a></h2>`];
  if (fam.parent) {
    const [ps, pid, score, cos, cont] = fam.parent, pix = await index(ps);
    parts.push(html`<p>Parent in <b>${ps}</b>: <a href="${href(["s", ps, "l", String(pid)])}">#${pid}</a> ${topTokensHtml(pix, pid)}
      <span class="muted small">score ${fmt(score)} · decoder cos ${fmt(cos)} · active with the parent ${pct(cont)} of the time</span></p>`);
  }
  if (fam.children.length) {
    const cs = fam.children[0][0], cix = await index(cs);
    parts.push(html`<p>Splits into ${count(fam.children.length, "latent", "latents")} of <b>${cs}</b>:</p><table><tr><th>child</th><th>score</th><th>cos</th><th>share of parent's tokens</th><th>fires most on</th></tr>
      ${fam.children.map(([s, j, score, cos, share]) => html`<tr><td><a href="${href(["s", s, "l", String(j)])}">#${j}</a></td><td class="num">${fmt(score)}</td>
        <td class="num">${fmt(cos)}</td><td class="num">${pct(share)}</td><td>${topTokensHtml(cix, j)}</td></tr>`)}</table>`);
  }
  return html`${parts}`;
}

function explanationHtml(e) {
  if (!e) return "";
  const f1 = e.f1 !== null && e.f1 !== undefined ? html`; held-out F1 ${fmt(e.f1)}` : "";
  if (!e.patterns.length)  // N2G was run on the latent and found nothing that predicts it
    return html`<div class="expl" id="explanation"><b>N2G explanation</b> <span class="muted small">none: N2G found no pattern for this latent${f1}</span></div>`;
  return html`<div class="expl" id="explanation"><b>N2G explanation</b> <span class="muted small">patterns that end at the firing token; … = any token${f1}</span>
      <div>${e.patterns.slice(0, 6).map(p => html`<span class="tok pat">${showTok(String(p.text))}</span><span class="muted small">${fmt(p.value)}${p.count > 1 ? " ×" + p.count : ""}</span> `)}</div></div>`;
}

function bandsHtml(rec, scale) {
  if (!rec.bands.length) return html`<p class="muted">never active</p>`;
  const n = rec.bands.length;
  const title = k => (n === 1 ? "all" : `band ${k + 1} of ${n}`);
  return html`${rec.bands.map((b, k) => b.length ? html`<h3>${title(k)}
      <span class="muted small">${k === 0 ? "lowest" : k === n - 1 ? "highest" : ""} sampled context maxima</span></h3>
      <div class="examples">${b.slice().reverse().map(j => exampleHtml(rec.samples[j], scale))}</div>` : "").reverse()}`;
}

async function showLatent(name, idText) {
  setNav("s:" + name);
  const ix = await index(name);
  const id = indexBelow(idText, ix.n_latents);
  if (id === null) { render($("#main"), html`<p class="err">No latent ${idText} in ${name}.</p>`); return; }
  const rec = await latent(name, id);
  if (rec.family) rec.family.self = id;
  const scale = rec.max;
  const nav = html`<span class="small">${id > 0 ? html`<a href="${href(["s", name, "l", String(id - 1)])}">← #${id - 1}</a>` : ""}
     ${id + 1 < ix.n_latents ? html` · <a href="${href(["s", name, "l", String(id + 1)])}">#${id + 1} →</a>` : ""}</span>`;
  render($("#main"), html`
    <p class="small"><a href="${href(["s", name])}">${name}</a> / latent ${id} ${nav}</p>
    <h1 id="latent-title">${name} · latent #${id}</h1>
    <div class="cards">
      <div class="card"><b>${pct(rec.density)}</b><span>density (${rec.count.toLocaleString()} of ${ix.n_tokens.toLocaleString()} tokens)</span></div>
      <div class="card"><b>${fmt(rec.max, 4)}</b><span>max activation</span></div>
      <div class="card"><b>${fmt(rec.mean, 4)}</b><span>mean when active</span></div>
      <div class="card"><b>${ix.top_tokens[id].length ? topTokensHtml(ix, id, 6) : "–"}</b><span>fires most on (≥ half its max, in its top contexts)</span></div>
    </div>
    ${explanationHtml(rec.expl)}
    <h2>Top activations <span class="legend"><span>0</span><i></i><span>${fmt(scale, 4)}</span></span></h2>
    <div class="examples" id="top-examples">${rec.top.length ? rec.top.map(x => exampleHtml(x, scale)) : html`<p class="muted">never active</p>`}</div>
    <div class="grid2">
      <div><h2>Activation histogram</h2>${histogramSvg(rec, ix.n_tokens)}</div>
      <div><h2>Nearest latents <span class="muted small">decoder cosine</span></h2><table>${await neighbourRows(name, rec.near)}</table></div>
    </div>
    <h2>Direct logit effect <span class="muted small">W_U · (g ⊙ W_dec[${id}]), final norm weight applied</span></h2>
    <div class="grid2"><div><h3>promotes</h3>${logitTable(rec.pos, "pos")}</div><div><h3>suppresses</h3>${logitTable(rec.neg, "neg")}</div></div>
    ${await familyHtml(name, rec.family)}
    <h2>Quantile samples <span class="muted small">contexts drawn at random among those where the latent is active, by their maximum</span></h2>
    <div id="bands">${bandsHtml(rec, scale)}</div>`);
}

// ---- families ---------------------------------------------------------------------------------------------

let FAMILY_INDEX = null;
function familyIndex(fams) {
  if (FAMILY_INDEX) return FAMILY_INDEX;
  FAMILY_INDEX = new Map();
  fams.families.forEach((f, k) => { const walk = n => { FAMILY_INDEX.set(n.sae + ":" + n.latent, k); n.children.forEach(walk); }; walk(f); });
  return FAMILY_INDEX;
}

async function nodeHtml(n, marked, isRoot) {
  const ix = await index(n.sae);
  const edge = isRoot ? "" : html`<span class="edge">score ${fmt(n.score)} · cos ${fmt(n.cos)} · ${pct(n.share)} of parent's tokens</span>`;
  const kids = await Promise.all(n.children.map(c => nodeHtml(c, marked, false)));
  return html`<li class="node${marked(n) ? " focus" : ""}" data-node="${n.sae + ":" + n.latent}"><span class="label"><span class="sae">${n.sae}</span><a href="${href(["s", n.sae, "l", String(n.latent)])}">#${n.latent}</a>
    ${topTokensHtml(ix, n.latent)}<span class="muted small">${pct(n.density)}</span>${ix.expl[n.latent] ? html` <span class="small">${ix.expl[n.latent]}</span>` : ""}</span>${edge}
    ${kids.length ? html`<ul class="tree">${kids}</ul>` : ""}</li>`;
}

// The families to list and how to mark their nodes: one family (?focus=SAE:ID), those matching ?q=, or all.
async function chooseFamilies(fams, focus, q) {
  const all = fams.families.map((f, k) => k);
  if (focus) {
    const k = familyIndex(fams).get(focus);
    return {list: k === undefined ? [] : [k], marked: n => n.sae + ":" + n.latent === focus};
  }
  if (!q) return {list: all, marked: () => false};
  // families with a member latent that the search matches (same rules as the index search)
  const hit = new Map();
  for (const s of saeNames()) hit.set(s, searchScores(await index(s), q));
  const marked = n => hit.get(n.sae)[n.latent] > 0;
  const score = n => hit.get(n.sae)[n.latent] + n.children.reduce((a, c) => a + score(c), 0);
  const scored = all.map(k => [k, score(fams.families[k])]).filter(([, v]) => v > 0);
  scored.sort((a, b) => b[1] - a[1]);
  return {list: scored.map(([k]) => k), marked};
}

async function showFamilies(params) {
  setNav("families");
  if (!META.has_families) { render($("#main"), html`<p>This site has one SAE; families need several sizes (build with <code>saelab browse RUN1 RUN2 …</code>).</p>`); return; }
  const fams = await SAELAB.load("families", "data/families.js");
  const focusText = params.get("focus"), q = params.get("q") || "", per = 25;
  const focus = focusText === null ? null : parseFocus(focusText);
  const {list, marked} = focusText !== null && focus === null ? {list: [], marked: () => false} : await chooseFamilies(fams, focus, q);
  const pages = Math.ceil(list.length / per), page = pageOf(params.get("page"), Math.max(1, pages));
  const trees = await Promise.all(list.slice(page * per, (page + 1) * per).map(async (k, j) => {
    const f = fams.families[k], first = f.children.length;
    return html`<details class="fam" ${j < 8 || focus ? "open" : ""}><summary><b>${f.sae} #${f.latent}</b> splits into ${count(first, "latent", "latents")} of the next size
       <span class="pill">${f.n_descendants} descendants, ${f.depth} levels</span></summary><ul class="tree root">${await nodeHtml(f, marked, true)}</ul></details>`;
  }));
  const links = fams.links.map(l => html`<li>${l.parent_sae} → ${l.child_sae}: ${l.n_children_matched.toLocaleString()} of ${l.n_children_active.toLocaleString()} active latents of ${l.child_sae} have a parent</li>`);
  const all = html`<a href="${href(["families"])}">all families</a>`;
  render($("#main"), html`<h1>Feature families across sizes</h1>
    <p class="muted">Each latent of a larger SAE is linked to the latent of the next smaller SAE with the highest score
      √(decoder cosine × P(parent active | child active)) on ${fams.n_tokens.toLocaleString()} tokens, when it is at least ${fams.min_score}.
      A family is the tree under a latent without a parent: it shows how one latent splits into several of a larger SAE.</p>
    <ul>${links}</ul>
    ${focusText !== null ? html`<p>Family of <b>${focusText}</b> · ${all}</p>`
      : q ? html`<p id="results">${count(list.length, "family", "families")} with a latent matching <b class="query"></b> · ${all}</p>`
      : html`<p>${count(list.length, "family", "families")}, largest first. Search a token to find the families of latents that fire on it.</p>`}
    <div id="families">${trees.length ? trees : html`<p class="muted">${focus === null && focusText !== null ? `${focusText} is not a latent of this site.` : `${focusText || ""} is in no family (no parent and no children).`}</p>`}</div>
    ${pagerHtml(page, pages, p => href(["families"], Object.assign(q ? {q} : {}, {page: p})))}`);
  showQuery(q);
}

function showAbout() {
  setNav("about");
  const d = META.definitions;
  render($("#main"), html`<h1>About this site</h1>
    <table><tr><th>model</th><td>${META.model}</td></tr><tr><th>hook</th><td>${META.hook}</td></tr>
    <tr><th>text</th><td>${META.corpus}: ${META.n_contexts.toLocaleString()} contexts of ${META.context_size} tokens${META.contexts_drawn ? ` ${META.contexts_drawn}` : ""}, ${META.n_tokens.toLocaleString()} tokens scored (position 0 ${META.position_0})</td></tr>
    <tr><th>SAEs</th><td>${META.saes.map((s, j) => html`${j ? html`<br>` : ""}${s.name}: ${s.n_latents} latents, ${sparsity(s)}, ${s.alive} active, ${s.n_tokens.toLocaleString()} tokens scored (position 0 ${s.position_0}), from <code>${s.source}</code>`)}</td></tr>
    <tr><th>built</th><td>${META.built} in ${Object.entries(META.seconds).map(([k, v]) => `${k} ${v} s`).join(", ")}</td></tr></table>
    <h2>What the numbers mean</h2><table>${Object.entries(d).map(([k, v]) => html`<tr><th>${k}</th><td>${v}</td></tr>`)}</table>`);
}

function showNotFound(what) {
  setNav("");
  render($("#main"), html`<p class="err">${what}</p>`);
}

// ---- routing, search box, tooltip ----------------------------------------------------------------------

// #/s/SAE, #/s/SAE/l/ID, #/families, #/about, #/ (the first SAE); SAE must be one of the site's.
async function route() {
  const {parts, params} = parseHash();
  try {
    const [view, name] = parts;
    if (view === "s" && !saeInfo(name)) showNotFound(`No SAE named ${name === undefined ? "" : name} in this site.`);
    else if (view === "s" && parts.length === 2) await showIndex(name, params);
    else if (view === "s" && parts.length === 4 && parts[2] === "l") await showLatent(name, parts[3]);
    else if (view === "families" && parts.length === 1) await showFamilies(params);
    else if (view === "about" && parts.length === 1) showAbout();
    else if (view === undefined) await showIndex(saeNames()[0], params);
    else showNotFound(`No page ${parts.join("/")} in this site.`);
    $("#q").value = params.get("q") || "";
    document.body.dataset.ready = location.hash || "#/";
  } catch (err) {
    render($("#main"), html`<p class="err">${err.message}</p>`);
    document.body.dataset.ready = "error";
  }
  window.scrollTo(0, 0);
}

function currentSae() {
  const {parts} = parseHash();
  return parts[0] === "s" && saeInfo(parts[1]) ? parts[1] : saeNames()[0];
}

async function main() {
  try {
    META = await SAELAB.load("meta", "data/meta.js");
    VOCAB = await SAELAB.load("vocab", "data/vocab.js");
  } catch (err) {
    render($("#main"), html`<p class="err">${err.message}: is this a complete saelab site?</p>`);
    return;
  }
  $("#foot").textContent = `${META.model} · ${META.hook} · ${META.n_tokens.toLocaleString()} tokens · built ${META.built}`;
  $("#search").addEventListener("submit", ev => {
    ev.preventDefault();
    const q = $("#q").value.trim();
    const onFamilies = parseHash().parts[0] === "families";
    location.hash = onFamilies ? href(["families"], q ? {q} : {}) : href(["s", currentSae()], q ? {q} : {});
  });
  const tip = $("#tip");
  document.addEventListener("mouseover", ev => {
    const t = ev.target.closest && ev.target.closest(".t.act");
    if (!t) { tip.hidden = true; return; }
    tip.textContent = `${t.dataset.tok}  ${t.dataset.act}`;
    const r = t.getBoundingClientRect();
    tip.style.left = `${Math.min(r.left, innerWidth - 220)}px`;
    tip.style.top = `${r.bottom + 6}px`;
    tip.hidden = false;
  });
  window.addEventListener("hashchange", route);
  await route();
}

main();
