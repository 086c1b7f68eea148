// saelab feature browser: a static viewer over data/*.js files (see saelab/explore/browser/site.py).
// Data files call SAELAB.put(key, value); they are loaded with <script> tags so that the site also
// works when opened from disk. Routes: #/s/SAE (index, ?q= search, ?sort=&dir=&page=),
// #/s/SAE/l/ID (latent page), #/families (?focus=SAE:ID), #/about.
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
const Q_SCALE = 10000;
let META = null, VOCAB = null;

function fmt(x, d = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1000) return x.toFixed(0);
  if (a < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(d)).toString();
}
function pct(x) {
  if (!x) return "0";
  const p = 100 * x;
  return (p >= 1 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(3) : p.toExponential(1)) + "%";
}
const tokText = id => (VOCAB && VOCAB[id] !== undefined ? VOCAB[id] : "⟨" + id + "⟩");
const showTok = s => s.replace(/\n/g, "↵").replace(/\t/g, "⇥");
const tokChip = id => `<span class="tok">${esc(showTok(tokText(id)))}</span>`;

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query] = h.split("?");
  const params = new URLSearchParams(query || "");
  return {parts: path.split("/").filter(Boolean).map(decodeURIComponent), params};
}
function href(parts, params) {
  const q = params && Object.keys(params).length ? "?" + new URLSearchParams(params).toString() : "";
  return "#/" + parts.map(encodeURIComponent).join("/") + q;
}
const saeNames = () => META.saes.map(s => s.name);
const saeInfo = name => META.saes.find(s => s.name === name);

async function index(name) { return SAELAB.load("index/" + name, `data/${name}/index.js`); }
async function latent(name, id) {
  const ix = await index(name);
  const c = Math.floor(id / ix.chunk);
  const recs = await SAELAB.load(`latents/${name}/${c}`, `data/${name}/l/${String(c).padStart(4, "0")}.js`);
  return recs[id - c * ix.chunk];
}

function setNav(active) {
  const items = saeNames().map(n => [href(["s", n]), n + ` <span class="muted small">${saeInfo(n).n_latents}</span>`, "s:" + n]);
  if (META.has_families) items.push([href(["families"]), "Families", "families"]);
  items.push([href(["about"]), "About", "about"]);
  $("#nav").innerHTML = items.map(([h, label, key]) => `<a href="${h}" class="${key === active ? "on" : ""}">${label}</a>`).join("");
}

// ---- index and search ------------------------------------------------------------------------------------

function topTokensHtml(ix, i, n = 3) {
  return ix.top_tokens[i].slice(0, n).map(([t, c]) => tokChip(t) + (c > 1 ? `<span class="muted small">×${c}</span> ` : "")).join("");
}

// Search: a query is split into words; a latent scores when a word equals (or is part of) one of the
// tokens it fires strongly on in its top contexts (at least half its max; up to 12 listed), one of
// the tokens it promotes most, or appears in its explanation.
function searchScores(ix, query) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const scores = new Float64Array(ix.n_latents);
  const norm = id => tokText(id).trim().toLowerCase();
  for (let i = 0; i < ix.n_latents; i++) {
    let s = 0;
    for (const w of words) {
      for (const [t, c] of ix.top_tokens[i]) {
        const x = norm(t);
        if (x === w) s += 10 * c; else if (w.length > 1 && x.includes(w)) s += 3 * c;
      }
      for (const t of ix.promoted[i]) {
        const x = norm(t);
        if (x === w) s += 4; else if (w.length > 1 && x.includes(w)) s += 1;
      }
      if (ix.expl[i] && ix.expl[i].toLowerCase().includes(w)) s += 20;
    }
    scores[i] = s;
  }
  return scores;
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
  let bars = counts.map((c, b) => {
    const h = (H - 20) * c / m, x0 = lo + (hi - lo) * b / nb;
    return `<rect class="b" x="${b * bw + 1}" y="${H - 16 - h}" width="${bw - 2}" height="${h}"><title>10^${x0.toFixed(1)}…: ${c} latents</title></rect>`;
  }).join("");
  const ticks = [-7, -6, -5, -4, -3, -2, -1, 0].map(t => `<text x="${(t - lo) / (hi - lo) * W}" y="${H - 2}" text-anchor="middle">1e${t}</text>`).join("");
  return `<svg width="${W + 20}" height="${H}" viewBox="-10 0 ${W + 20} ${H}" role="img" aria-label="density histogram">${bars}${ticks}</svg>
    <div class="muted small">log10 density of the ${ix.n_latents - dead} active latents; ${dead} never active on these ${ix.n_tokens.toLocaleString()} tokens</div>`;
}

async function showIndex(name, params) {
  setNav("s:" + name);
  const ix = await index(name);
  const q = params.get("q") || "";
  const m = q.trim().match(/^#?(\d+)$/);
  if (m && +m[1] < ix.n_latents) { location.hash = href(["s", name, "l", m[1]]); return; }
  const sort = params.get("sort") || (q ? "match" : "max"), dir = params.get("dir") || "desc";
  const page = +(params.get("page") || 0), per = 100;
  let ids = [...Array(ix.n_latents).keys()];
  let scores = null;
  if (q) { scores = searchScores(ix, q); ids = ids.filter(i => scores[i] > 0); }
  const key = {
    id: i => i, density: i => ix.density[i], max: i => ix.max[i], mean: i => ix.mean[i],
    expl: i => ix.expl[i] || "\uffff", match: i => (scores ? scores[i] : 0) * 1e6 + ix.max[i],
  }[sort] || (i => ix.max[i]);
  ids.sort((a, b) => { const x = key(a), y = key(b); const c = x < y ? -1 : x > y ? 1 : a - b; return dir === "asc" ? c : -c; });
  const pages = Math.max(1, Math.ceil(ids.length / per));
  const shown = ids.slice(page * per, (page + 1) * per);
  const info = saeInfo(name);
  const link = (s) => href(["s", name], Object.assign({}, q ? {q} : {}, {sort: s, dir: s === sort && dir === "desc" ? "asc" : "desc"}));
  const th = (s, label) => `<th class="sort ${s === sort ? "on " + dir : ""}" data-sort="${s}"><a href="${link(s)}">${label}</a></th>`;
  const pager = pages > 1 ? `<div class="pager">${page > 0 ? `<a href="${href(["s", name], Object.assign({}, q ? {q} : {}, {sort, dir, page: page - 1}))}">← prev</a>` : ""}
      <span>page ${page + 1} of ${pages}</span>
      ${page + 1 < pages ? `<a href="${href(["s", name], Object.assign({}, q ? {q} : {}, {sort, dir, page: page + 1}))}">next →</a>` : ""}</div>` : "";
  $("#main").innerHTML = `
    <h1>${esc(name)} <span class="muted small">${info.n_latents.toLocaleString()} latents, k = ${info.k}, ${esc(META.hook)} of ${esc(META.model)}</span></h1>
    ${q ? `<p id="results">${ids.length.toLocaleString()} latents match <b>${esc(q)}</b> (their top-activating or promoted tokens, or explanation). <a href="${href(["s", name])}">clear</a></p>`
        : densityPlot(ix)}
    ${pager}
    <table id="latents"><thead><tr>${th("id", "latent")}${th("density", "density")}${th("max", "max act")}${th("mean", "mean act")}
      <th>fires most on</th><th>promotes</th>${th("expl", "explanation")}</tr></thead><tbody>
    ${shown.map(i => `<tr class="row"><td><a href="${href(["s", name, "l", String(i)])}">#${i}</a></td>
       <td class="num">${pct(ix.density[i])}</td><td class="num">${fmt(ix.max[i])}</td><td class="num">${fmt(ix.mean[i])}</td>
       <td>${topTokensHtml(ix, i)}</td><td>${ix.promoted[i].slice(0, 3).map(tokChip).join("")}</td><td class="small">${esc(ix.expl[i] || "")}</td></tr>`).join("")}
    </tbody></table>${pager}`;
}

// ---- latent page ------------------------------------------------------------------------------------------

function exampleHtml(ex, scale) {
  const [ctx, start, ids, q] = ex;
  let peak = 0, best = -1;
  q.forEach((v, j) => { if (v > peak) { peak = v; best = j; } });
  const spans = ids.map((id, j) => {
    const a = q[j] * scale / Q_SCALE, s = tokText(id);
    const txt = s.includes("\n") ? esc(s.replace(/\n/g, "↵")) + "\n" : esc(s);
    if (!q[j]) return `<span class="t" data-act="0" data-tok="${esc(showTok(s))}">${txt}</span>`;
    const alpha = (0.08 + 0.92 * q[j] / Q_SCALE).toFixed(3);
    return `<span class="t act${j === best ? " peak" : ""}" style="background:rgba(var(--hl),${alpha})" data-act="${fmt(a, 4)}" data-tok="${esc(showTok(s))}">${txt}</span>`;
  }).join("");
  return `<div class="ex" data-ctx="${ctx}"><span class="v">${fmt(peak * scale / Q_SCALE)}</span><span class="text">${spans}</span></div>`;
}

function histogramSvg(rec) {
  const [top, counts] = rec.hist;
  if (!counts.length) return `<p class="muted">never active</p>`;
  const nb = META.config.n_bins, W = 520, H = 130, bw = W / nb;
  const logc = counts.map(c => (c ? Math.log10(c) + 1 : 0)), m = Math.max(...logc, 1);
  const bars = counts.map((c, b) => {
    const h = (H - 22) * logc[b] / m;
    return c ? `<rect class="b" x="${b * bw}" y="${H - 18 - h}" width="${Math.max(1, bw - 1)}" height="${h}"><title>${fmt(top * b / nb)} – ${fmt(top * (b + 1) / nb)}: ${c.toLocaleString()} tokens</title></rect>` : "";
  }).join("");
  const ticks = [0, 0.25, 0.5, 0.75, 1].map(f => `<text x="${f * W}" y="${H - 3}" text-anchor="middle">${fmt(top * f)}</text>`).join("");
  return `<svg width="${W + 30}" height="${H}" viewBox="-15 0 ${W + 30} ${H}" role="img" aria-label="activation histogram">${bars}${ticks}</svg>
    <div class="muted small">nonzero activations over ${META.n_tokens.toLocaleString()} tokens (log count); max ${fmt(rec.max, 4)}</div>`;
}

function logitTable(rows, cls) {
  const m = Math.max(...rows.map(r => Math.abs(r[1])), 1e-9);
  return `<table class="bars">${rows.map(([t, v]) => `<tr><td>${tokChip(t)}</td><td class="num">${fmt(v)}</td>
    <td style="width:45%"><span class="bar ${cls}" style="width:${(100 * Math.abs(v) / m).toFixed(1)}%"></span></td></tr>`).join("")}</table>`;
}

async function neighbourRows(name, near) {
  const ix = await index(name);
  return near.map(([j, c]) => `<tr><td><a href="${href(["s", name, "l", String(j)])}">#${j}</a></td><td class="num">${fmt(c)}</td><td>${topTokensHtml(ix, j)}</td></tr>`).join("");
}

async function familyHtml(name, fam) {
  if (!fam || (!fam.parent && !fam.children.length)) return "";
  let html = `<h2>Family across sizes <a class="small" href="${href(["families"], {focus: name + ":" + fam.self})}">show tree</a></h2>`;
  if (fam.parent) {
    const [ps, pid, score, cos, cont] = fam.parent, pix = await index(ps);
    html += `<p>Parent in <b>${esc(ps)}</b>: <a href="${href(["s", ps, "l", String(pid)])}">#${pid}</a> ${topTokensHtml(pix, pid)}
      <span class="muted small">score ${fmt(score)} · decoder cos ${fmt(cos)} · active with the parent ${pct(cont)} of the time</span></p>`;
  }
  if (fam.children.length) {
    const cs = fam.children[0][0], cix = await index(cs);
    html += `<p>Splits into ${fam.children.length} latent${fam.children.length > 1 ? "s" : ""} of <b>${esc(cs)}</b>:</p><table><tr><th>child</th><th>score</th><th>cos</th><th>share of parent's tokens</th><th>fires most on</th></tr>
      ${fam.children.map(([s, j, score, cos, share]) => `<tr><td><a href="${href(["s", s, "l", String(j)])}">#${j}</a></td><td class="num">${fmt(score)}</td>
        <td class="num">${fmt(cos)}</td><td class="num">${pct(share)}</td><td>${topTokensHtml(cix, j)}</td></tr>`).join("")}</table>`;
  }
  return html;
}

async function showLatent(name, id) {
  setNav("s:" + name);
  const ix = await index(name);
  if (!(id >= 0 && id < ix.n_latents)) { $("#main").innerHTML = `<p class="err">No latent ${esc(id)} in ${esc(name)}.</p>`; return; }
  const rec = await latent(name, id);
  if (rec.family) rec.family.self = id;
  const scale = rec.max;
  const nav = `<span class="small">${id > 0 ? `<a href="${href(["s", name, "l", String(id - 1)])}">← #${id - 1}</a>` : ""}
     ${id + 1 < ix.n_latents ? ` · <a href="${href(["s", name, "l", String(id + 1)])}">#${id + 1} →</a>` : ""}</span>`;
  const bandNames = n => n === 1 ? ["all"] : [...Array(n).keys()].map(b => `band ${b + 1} of ${n}`);
  const bands = rec.bands.length ? rec.bands.map((b, k) => b.length ? `<h3>${bandNames(rec.bands.length)[k]}
      <span class="muted small">${k === 0 ? "lowest" : k === rec.bands.length - 1 ? "highest" : ""} sampled context maxima</span></h3>
      <div class="examples">${b.slice().reverse().map(j => exampleHtml(rec.samples[j], scale)).join("")}</div>` : "").reverse().join("") : `<p class="muted">never active</p>`;
  const e = rec.expl;
  $("#main").innerHTML = `
    <p class="small"><a href="${href(["s", name])}">${esc(name)}</a> / latent ${id} ${nav}</p>
    <h1 id="latent-title">${esc(name)} · latent #${id}</h1>
    <div class="cards">
      <div class="card"><b>${pct(rec.density)}</b><span>density (${rec.count.toLocaleString()} of ${ix.n_tokens.toLocaleString()} tokens)</span></div>
      <div class="card"><b>${fmt(rec.max, 4)}</b><span>max activation</span></div>
      <div class="card"><b>${fmt(rec.mean, 4)}</b><span>mean when active</span></div>
      <div class="card"><b>${ix.top_tokens[id].length ? topTokensHtml(ix, id, 6) : "–"}</b><span>fires most on (≥ half its max, in its top contexts)</span></div>
    </div>
    ${e ? `<div class="expl" id="explanation"><b>N2G explanation</b> <span class="muted small">patterns that end at the firing token; … = any token${e.f1 !== null && e.f1 !== undefined ? `; held-out F1 ${fmt(e.f1)}` : ""}</span>
      <div>${e.patterns.slice(0, 6).map(p => `<span class="tok pat">${esc(showTok(p.text))}</span><span class="muted small">${fmt(p.value)}${p.count > 1 ? " ×" + p.count : ""}</span> `).join("")}</div></div>` : ""}
    <h2>Top activations <span class="legend"><span>0</span><i></i><span>${fmt(scale, 4)}</span></span></h2>
    <div class="examples" id="top-examples">${rec.top.map(x => exampleHtml(x, scale)).join("") || `<p class="muted">never active</p>`}</div>
    <div class="grid2">
      <div><h2>Activation histogram</h2>${histogramSvg(rec)}</div>
      <div><h2>Nearest latents <span class="muted small">decoder cosine</span></h2><table>${await neighbourRows(name, rec.near)}</table></div>
    </div>
    <h2>Direct logit effect <span class="muted small">W_U · (g ⊙ W_dec[${id}]), final norm weight applied</span></h2>
    <div class="grid2"><div><h3>promotes</h3>${logitTable(rec.pos, "pos")}</div><div><h3>suppresses</h3>${logitTable(rec.neg, "neg")}</div></div>
    ${await familyHtml(name, rec.family)}
    <h2>Quantile samples <span class="muted small">contexts drawn at random among those where the latent is active, by their maximum</span></h2>
    <div id="bands">${bands}</div>`;
}

// ---- families ---------------------------------------------------------------------------------------------

let FAMILY_INDEX = null;
function familyIndex(fams) {
  if (FAMILY_INDEX) return FAMILY_INDEX;
  FAMILY_INDEX = new Map();
  fams.families.forEach((f, k) => { const walk = n => { FAMILY_INDEX.set(n.sae + ":" + n.latent, k); n.children.forEach(walk); }; walk(f); });
  return FAMILY_INDEX;
}

async function nodeHtml(n, focus, isRoot) {
  const ix = await index(n.sae);
  const edge = isRoot ? "" : `<span class="edge">score ${fmt(n.score)} · cos ${fmt(n.cos)} · ${pct(n.share)} of parent's tokens</span>`;
  const kids = await Promise.all(n.children.map(c => nodeHtml(c, focus, false)));
  const me = n.sae + ":" + n.latent;
  return `<li class="node${focus(me) ? " focus" : ""}" data-node="${esc(me)}"><span class="label"><span class="sae">${esc(n.sae)}</span><a href="${href(["s", n.sae, "l", String(n.latent)])}">#${n.latent}</a>
    ${topTokensHtml(ix, n.latent)}<span class="muted small">${pct(n.density)}</span>${ix.expl[n.latent] ? ` <span class="small">${esc(ix.expl[n.latent])}</span>` : ""}</span>${edge}
    ${kids.length ? `<ul class="tree">${kids.join("")}</ul>` : ""}</li>`;
}

async function showFamilies(params) {
  setNav("families");
  if (!META.has_families) { $("#main").innerHTML = `<p>This site has one SAE; families need several sizes (build with <code>saelab browse RUN1 RUN2 …</code>).</p>`; return; }
  const fams = await SAELAB.load("families", "data/families.js");
  const focus = params.get("focus"), q = params.get("q") || "", page = +(params.get("page") || 0), per = 25;
  let list = fams.families.map((f, k) => k);
  let marked = key => key === focus;
  if (focus) { const k = familyIndex(fams).get(focus); list = k === undefined ? [] : [k]; }
  else if (q) {
    // families with a member latent that the search matches (same rules as the index search)
    const hit = {};
    for (const s of saeNames()) { const sc = searchScores(await index(s), q); hit[s] = sc; }
    marked = key => { const [s, l] = key.split(":"); return hit[s][+l] > 0; };
    const score = n => hit[n.sae][n.latent] + n.children.reduce((a, c) => a + score(c), 0);
    const scored = list.map(k => [k, score(fams.families[k])]).filter(([, v]) => v > 0);
    scored.sort((a, b) => b[1] - a[1]);
    list = scored.map(([k]) => k);
  }
  const shown = list.slice(page * per, (page + 1) * per);
  const trees = await Promise.all(shown.map(async (k, j) => {
    const f = fams.families[k];
    const first = f.children.length;
    return `<details class="fam" ${j < 8 || focus ? "open" : ""}><summary><b>${esc(f.sae)} #${f.latent}</b> splits into ${first} latent${first > 1 ? "s" : ""} of the next size
       <span class="pill">${f.n_descendants} descendants, ${f.depth} levels</span></summary><ul class="tree root">${await nodeHtml(f, marked, true)}</ul></details>`;
  }));
  const links = fams.links.map(l => `<li>${esc(l.parent_sae)} → ${esc(l.child_sae)}: ${l.n_children_matched.toLocaleString()} of ${l.n_children_active.toLocaleString()} active latents of ${esc(l.child_sae)} have a parent</li>`).join("");
  const pages = Math.ceil(list.length / per);
  $("#main").innerHTML = `<h1>Feature families across sizes</h1>
    <p class="muted">Each latent of a larger SAE is linked to the latent of the next smaller SAE with the highest score
      √(decoder cosine × P(parent active | child active)) on ${fams.n_tokens.toLocaleString()} tokens, when it is at least ${fams.min_score}.
      A family is the tree under a latent without a parent: it shows how one latent splits into several of a larger SAE.</p>
    <ul>${links}</ul>
    ${focus ? `<p>Family of <b>${esc(focus)}</b> · <a href="${href(["families"])}">all families</a></p>`
      : q ? `<p id="results">${list.length.toLocaleString()} families with a latent matching <b>${esc(q)}</b> · <a href="${href(["families"])}">all families</a></p>`
      : `<p>${list.length.toLocaleString()} families, largest first. Search a token to find the families of latents that fire on it.</p>`}
    <div id="families">${trees.join("") || `<p class="muted">${esc(focus || "")} is in no family (no parent and no children).</p>`}</div>
    ${pages > 1 ? `<div class="pager">${page > 0 ? `<a href="${href(["families"], Object.assign(q ? {q} : {}, {page: page - 1}))}">← prev</a>` : ""}<span>page ${page + 1} of ${pages}</span>${page + 1 < pages ? `<a href="${href(["families"], Object.assign(q ? {q} : {}, {page: page + 1}))}">next →</a>` : ""}</div>` : ""}`;
}

function showAbout() {
  setNav("about");
  const d = META.definitions;
  $("#main").innerHTML = `<h1>About this site</h1>
    <table><tr><th>model</th><td>${esc(META.model)}</td></tr><tr><th>hook</th><td>${esc(META.hook)}</td></tr>
    <tr><th>text</th><td>${esc(META.corpus)}: ${META.n_contexts.toLocaleString()} contexts of ${META.context_size} tokens, ${META.n_tokens.toLocaleString()} tokens scored (position 0 ${META.position_0})</td></tr>
    <tr><th>SAEs</th><td>${META.saes.map(s => `${esc(s.name)}: ${s.n_latents} latents, k = ${s.k}, ${s.alive} active, from <code>${esc(s.source)}</code>`).join("<br>")}</td></tr>
    <tr><th>built</th><td>${esc(META.built)} in ${Object.entries(META.seconds).map(([k, v]) => `${k} ${v} s`).join(", ")}</td></tr></table>
    <h2>What the numbers mean</h2><table>${Object.entries(d).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join("")}</table>`;
}

// ---- routing, search box, tooltip ----------------------------------------------------------------------

async function route() {
  const {parts, params} = parseHash();
  try {
    if (parts[0] === "s" && parts[1] && parts[2] === "l") await showLatent(parts[1], +parts[3]);
    else if (parts[0] === "s" && parts[1]) await showIndex(parts[1], params);
    else if (parts[0] === "families") await showFamilies(params);
    else if (parts[0] === "about") showAbout();
    else await showIndex(saeNames()[0], params);
    $("#q").value = params.get("q") || "";
    document.body.dataset.ready = location.hash || "#/";
  } catch (err) {
    $("#main").innerHTML = `<p class="err">${esc(err.message)}</p>`;
    document.body.dataset.ready = "error";
  }
  window.scrollTo(0, 0);
}

function currentSae() {
  const {parts} = parseHash();
  return parts[0] === "s" && saeNames().includes(parts[1]) ? parts[1] : saeNames()[0];
}

async function main() {
  try {
    META = await SAELAB.load("meta", "data/meta.js");
    VOCAB = await SAELAB.load("vocab", "data/vocab.js");
  } catch (err) {
    $("#main").innerHTML = `<p class="err">${esc(err.message)}: is this a complete saelab site?</p>`;
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
