"""The page of the `sae inspect` site: one self-contained HTML file with inline CSS and JavaScript.

Routes: `#/` the index (sortable, paged table of all latents, density histogram), `#/latent/N` latent N.
Data comes from data/index.js and data/latents-NNNNN.js (loaded as scripts, so file:// works). Light colours,
system fonts, focus outlines kept; ← and → step through latents on a latent's page.
"""

APP_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<title>SAE latents</title>
<style>
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --bg: #ffffff; --soft: #f6f8fa; --link: #0550ae; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 48px; }
a { color: var(--link); }
a:focus-visible, button:focus-visible, input:focus-visible, summary:focus-visible {
  outline: 3px solid #0969da; outline-offset: 2px; }
h1 { font-size: 1.5rem; margin: 8px 0 4px; }
h2 { font-size: 1.15rem; margin: 24px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 1rem; margin: 16px 0 6px; }
.muted { color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; color: var(--fg); }
.bar { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin: 12px 0; }
button.btn, input { font: inherit; padding: 3px 10px; border: 1px solid var(--line); border-radius: 6px; background: var(--soft); }
input { background: #fff; }
.snip { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; white-space: pre-wrap; }
mark { background: #ffd8a8; color: inherit; }
.cols { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 20px; }
@media (max-width: 900px) { .cols { grid-template-columns: 1fr; } }
.ex { border: 1px solid var(--line); border-radius: 6px; padding: 6px 8px; margin: 6px 0; background: #fff; }
.ex .meta { font-size: 12px; color: var(--muted); margin-bottom: 2px; }
.ex .massive { color: #9a3412; font-weight: 600; }
.toks { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9;
  white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.focus { outline: 2px solid #b42318; outline-offset: 0; font-weight: 700; }
.tok.na { color: #8c959f; text-decoration: underline dotted; }
ol.examples { padding-left: 1.6em; margin: 0; }
svg text { font: 11px system-ui, sans-serif; fill: #1b1f24; }
.logits td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #b42318; font-weight: 600; }
</style>
</head>
<body>
<main id="app" aria-live="polite"><p>Loading…</p></main>
<script>
"use strict";
const S = { index: null, chunks: {}, pending: {}, sort: { key: "i", dir: 1 }, page: 0, hideDead: false };
const PAGE = 100;
window.SAE_INSPECT = {
  index(d) { S.index = d; S.pos = new Map(d.columns.i.map((v, k) => [v, k])); },
  chunk(d) { S.chunks[d.chunk] = d; (S.pending[d.chunk] || []).forEach(f => f()); delete S.pending[d.chunk]; },
};
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }
function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e-3 && a < 1e5) return String(Number(v.toPrecision(4)));
  return v.toExponential(3);
}
function pct(v) { return v === null || v === undefined ? "–" : fmt(100 * v) + " %"; }
function shown(t) { return t === "" ? "∅" : t.replace(/\n/g, "↵").replace(/\t/g, "⇥"); }
function loadChunk(k, then) {
  if (S.chunks[k]) return then();
  if (S.pending[k]) { S.pending[k].push(then); return; }
  S.pending[k] = [then];
  const s = document.createElement("script");
  s.src = "data/latents-" + String(k).padStart(5, "0") + ".js";
  s.onerror = () => { app().innerHTML = '<p class="error">Could not load ' + esc(s.src) + "</p>"; };
  document.head.appendChild(s);
}
function app() { return document.getElementById("app"); }

function histogramSvg(edges, counts, opts) {
  // Bars of log10(count) (the log-density axis), for counts > 0.
  const W = opts.width || 560, H = 180, L = 44, B = 34, T = 8, R = 10;
  const n = counts.length, maxc = Math.max(1, ...counts);
  const top = Math.max(1, Math.ceil(Math.log10(maxc + 1)));
  const x0 = edges[0], x1 = edges[n];
  const X = v => L + (W - L - R) * (v - x0) / ((x1 - x0) || 1);
  const Y = c => T + (H - T - B) * (1 - Math.log10(c + 1) / top);
  let g = "";
  for (let i = 0; i < n; i++) {
    if (!counts[i]) continue;
    const x = X(edges[i]), w = Math.max(1, X(edges[i + 1]) - x - 0.5);
    g += '<rect x="' + x.toFixed(1) + '" y="' + Y(counts[i]).toFixed(1) + '" width="' + w.toFixed(1) +
      '" height="' + (H - B - Y(counts[i])).toFixed(1) + '" fill="' + (opts.color || "#3b6ea8") + '"><title>' +
      esc(fmt(edges[i]) + "–" + fmt(edges[i + 1]) + ": " + counts[i]) + "</title></rect>";
  }
  for (let p = 0; p <= top; p++) {
    const y = Y(Math.pow(10, p) - 1);
    g += '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + y + '" y2="' + y + '" stroke="#d0d7de"/>' +
      '<text x="' + (L - 4) + '" y="' + (y + 4) + '" text-anchor="end">' + (p === 0 ? "0" : "1e" + p) + "</text>";
  }
  for (let t = 0; t <= 4; t++) {
    const v = x0 + (x1 - x0) * t / 4;
    g += '<text x="' + X(v) + '" y="' + (H - B + 14) + '" text-anchor="middle">' + esc(opts.tick ? opts.tick(v) : fmt(v)) + "</text>";
  }
  g += '<text x="' + ((L + W - R) / 2) + '" y="' + (H - 4) + '" text-anchor="middle">' + esc(opts.xlabel) + "</text>";
  return '<svg role="img" aria-label="' + esc(opts.label) + '" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W +
    " " + H + '">' + g + "</svg>";
}

// ---------------------------------------------------------------------------------------------- index
const COLS = [
  ["i", "Latent", true], ["density", "Density", true], ["mean", "Mean act", true], ["max", "Max act", true],
  ["massive_share", "On massive rows", true], ["snippet", "Top example", false], ["top_logit", "Top logit", false],
];
function order() {
  const c = S.index.columns, n = c.i.length, k = S.sort.key, d = S.sort.dir;
  let ids = [...Array(n).keys()];
  if (S.hideDead) ids = ids.filter(j => c.count[j] > 0);
  ids.sort((a, b) => {
    const x = c[k][a], y = c[k][b];
    if (x === y) return c.i[a] - c.i[b];
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * d;
  });
  return ids;
}
function renderIndex() {
  const d = S.index, c = d.columns, ids = order();
  const pages = Math.max(1, Math.ceil(ids.length / PAGE));
  S.page = Math.min(S.page, pages - 1);
  const rows = ids.slice(S.page * PAGE, (S.page + 1) * PAGE).map(j => {
    const sn = c.snippet[j];
    const snip = sn ? '<span class="snip">' + esc(shown(sn[0])) + "<mark>" + esc(shown(sn[1])) + "</mark>" + esc(shown(sn[2])) + "</span>" : '<span class="muted">never fired</span>';
    return '<tr data-latent="' + c.i[j] + '"><td><a href="#/latent/' + c.i[j] + '">' + c.i[j] + "</a></td>" +
      '<td class="num" data-value="' + c.density[j] + '">' + fmt(c.density[j]) + "</td>" +
      '<td class="num" data-value="' + c.mean[j] + '">' + fmt(c.mean[j]) + "</td>" +
      '<td class="num" data-value="' + c.max[j] + '">' + fmt(c.max[j]) + "</td>" +
      '<td class="num">' + pct(c.massive_share[j]) + "</td><td>" + snip + '</td><td class="snip">' +
      (c.top_logit[j] === null ? "–" : esc(shown(c.top_logit[j]))) + "</td></tr>";
  }).join("");
  const head = COLS.map(([k, label, sortable]) => {
    const num = ["density", "mean", "max", "massive_share"].includes(k) ? ' class="num"' : "";
    if (!sortable) return "<th scope=\"col\"" + num + ">" + label + "</th>";
    const cur = S.sort.key === k, arrow = cur ? (S.sort.dir > 0 ? " ▲" : " ▼") : "";
    return '<th scope="col"' + num + ' aria-sort="' + (cur ? (S.sort.dir > 0 ? "ascending" : "descending") : "none") +
      '"><button type="button" data-sort="' + k + '">' + label + arrow + "</button></th>";
  }).join("");
  const lo = ids.length ? S.page * PAGE + 1 : 0, hi = Math.min(ids.length, (S.page + 1) * PAGE);
  const left = Object.entries(d.left_out).filter(([, v]) => v).map(([k, v]) => v.toLocaleString() + " " + (k === "bos" ? "BOS" : k.replace("_", "-"))).join(", ") || "none";
  const src = d.source.store ? "store " + d.source.store : "text " + (d.source.dataset || "");
  const h = d.density_hist;
  app().innerHTML =
    "<h1>Latents of " + esc(d.sae.name) + "</h1>" +
    '<dl class="facts">' +
    "<dt>SAE</dt><dd>" + esc(d.sae.architecture) + (d.sae.trained_as ? " (trained as " + esc(d.sae.trained_as) + ")" : "") +
    ", d_in " + d.sae.d_in + ", " + d.sae.d_sae + " latents" + (d.sae.k ? ", k " + d.sae.k : "") + "; encoder: " + esc(d.sae.encoder) + "</dd>" +
    "<dt>Site</dt><dd>" + esc(d.sae.site) + "</dd><dt>Rows</dt><dd>" + esc(src) + ": " + d.rows_used.toLocaleString() +
    " used of " + d.rows_read.toLocaleString() + " read; left out: " + esc(left) + "</dd>" +
    '<dt>Latents</dt><dd><span id="n-latents">' + d.n_latents + '</span> inspected; <span id="n-dead">' + d.dead +
    '</span> dead (never fired); <span id="n-dense">' + d.dense + "</span> dense (density &gt; " + pct(d.dense_frequency) + ")</dd>" +
    "<dt>Massive rows</dt><dd>norm &gt; " + d.massive_factor + "× the median row norm (" + fmt(d.median_norm) + ")</dd></dl>" +
    "<h2>Firing density</h2>" +
    histogramSvg(h.edges, h.counts, { label: "histogram of log10 firing density over latents", xlabel: "log10 density (" + h.dead + " dead latents not shown)", tick: v => v.toFixed(1) }) +
    '<p><a href="density_histogram.png">PNG of this histogram</a></p>' +
    "<h2>All latents</h2>" +
    '<form class="bar" id="goto"><label for="goto-n">Go to latent</label> <input id="goto-n" type="number" min="0" max="' + (d.sae.d_sae - 1) + '" required> <button class="btn" type="submit">Open</button>' +
    '<label><input type="checkbox" id="hide-dead"' + (S.hideDead ? " checked" : "") + "> hide dead latents</label></form>" +
    '<table id="latents"><thead><tr>' + head + "</tr></thead><tbody>" + rows + "</tbody></table>" +
    '<div class="bar"><button class="btn" type="button" id="prev"' + (S.page === 0 ? " disabled" : "") + '>← previous</button>' +
    '<span id="range">' + lo + "–" + hi + " of " + ids.length + '</span><button class="btn" type="button" id="next"' +
    (S.page >= pages - 1 ? " disabled" : "") + ">next →</button></div>";
  app().querySelectorAll("button[data-sort]").forEach(b => b.addEventListener("click", () => {
    const k = b.dataset.sort;
    S.sort = { key: k, dir: S.sort.key === k ? -S.sort.dir : (k === "i" ? 1 : -1) };
    S.page = 0;
    history.replaceState(null, "", "#/?sort=" + (S.sort.dir < 0 ? "-" : "") + k);
    renderIndex();
    app().querySelector('button[data-sort="' + k + '"]').focus();
  }));
  document.getElementById("prev").onclick = () => { S.page--; renderIndex(); document.getElementById("prev").focus(); };
  document.getElementById("next").onclick = () => { S.page++; renderIndex(); document.getElementById("next").focus(); };
  document.getElementById("hide-dead").onchange = e => { S.hideDead = e.target.checked; S.page = 0; renderIndex(); document.getElementById("hide-dead").focus(); };
  document.getElementById("goto").onsubmit = e => { e.preventDefault(); location.hash = "#/latent/" + document.getElementById("goto-n").value; };
  document.title = "Latents of " + d.sae.name;
}

// ---------------------------------------------------------------------------------------------- a latent
function tokens(ex, vocab, max) {
  const f = ex.position - ex.start;
  return ex.tokens.map((t, k) => {
    const a = ex.acts[k], txt = vocab[t] !== undefined ? vocab[t] : "⟨" + t + "⟩";
    const cls = "tok" + (k === f ? " focus" : "") + (a === null ? " na" : "");
    const alpha = a === null || !max ? 0 : Math.max(0, Math.min(1, a / max));
    const style = alpha > 0 ? ' style="background: rgba(255, 140, 0, ' + alpha.toFixed(3) + ')"' : "";
    const title = a === null ? "left out (the SAE never trained on this row)" : "activation " + fmt(a);
    return '<span class="' + cls + '"' + style + ' title="' + esc(title) + '" data-act="' + (a === null ? "" : a) + '">' + esc(shown(txt)) + "</span>";
  }).join("");
}
function example(ex, vocab, max) {
  const massive = ex.norm !== null && ex.norm > S.index.massive_factor;
  return '<li class="ex" data-row="' + ex.row + '" data-act="' + ex.act + '"><div class="meta">activation <b>' + fmt(ex.act) +
    "</b> · store row " + ex.row + " · context " + ex.context + ", position " + ex.position + " · ‖x‖ " +
    (ex.norm === null ? "–" : fmt(ex.norm) + "× median") + (massive ? ' <span class="massive">massive row</span>' : "") +
    '</div><div class="toks">' + tokens(ex, vocab, max) + "</div></li>";
}
function renderLatent(n) {
  const d = S.index, j = S.pos.get(n);
  if (j === undefined) {
    app().innerHTML = '<p><a href="#/">← All latents</a></p><p class="error">Latent ' + esc(n) + " was not inspected (" + d.n_latents + " latents are).</p>";
    return;
  }
  const k = Math.floor(j / d.chunk_size);
  loadChunk(k, () => {
    if (S.route !== "latent/" + n) return;
    const ch = S.chunks[k], L = ch.latents[j - k * d.chunk_size], v = ch.vocab;
    const prev = j > 0 ? d.columns.i[j - 1] : null, next = j + 1 < d.n_latents ? d.columns.i[j + 1] : null;
    const nav = '<nav class="bar"><a href="#/">← All latents</a>' +
      (prev !== null ? '<a id="prev-latent" href="#/latent/' + prev + '">‹ latent ' + prev + "</a>" : "") +
      (next !== null ? '<a id="next-latent" href="#/latent/' + next + '">latent ' + next + " ›</a>" : "") +
      '<span class="muted">keys ← → step through latents</span></nav>';
    let body = "<h1>Latent " + L.i + "</h1>" + '<dl class="facts">' +
      '<dt>Density</dt><dd><span id="density" data-value="' + L.density + '">' + fmt(L.density) + "</span> (" +
      L.count.toLocaleString() + " of " + d.rows_used.toLocaleString() + " rows, " + pct(L.density) + ")</dd>" +
      '<dt>Mean activation</dt><dd><span id="mean" data-value="' + L.mean + '">' + fmt(L.mean) + "</span> (over nonzero)</dd>" +
      '<dt>Max activation</dt><dd><span id="max" data-value="' + L.max + '">' + fmt(L.max) + "</span></dd>" +
      "<dt>On massive rows</dt><dd>" + pct(L.massive_share) + " of its nonzero activations</dd></dl>";
    if (!L.count) {
      body += "<p>This latent never fired on the " + d.rows_used.toLocaleString() + " rows read.</p>";
    } else {
      const w = L.hist.width, edges = L.hist.counts.map((_, b) => b * w).concat([L.hist.counts.length * w]);
      body += '<div class="cols"><section><h2>Activations</h2>' +
        histogramSvg(edges, L.hist.counts, { label: "histogram of nonzero activations, log density", xlabel: "activation (y: log10 count)", width: 360, color: "#d9822b" }) +
        "</section>";
      if (L.logits) {
        const tbl = (rows, cls) => '<table class="logits ' + cls + '"><tbody>' + rows.map(([t, x]) =>
          '<tr><td class="snip">' + esc(shown(v[t] !== undefined ? v[t] : "⟨" + t + "⟩")) + "</td><td>" + fmt(x) + "</td></tr>").join("") + "</tbody></table>";
        body += '<section><h2>Promoted tokens</h2>' + tbl(L.logits.top, "pos") + "</section>" +
          '<section><h2>Suppressed tokens</h2>' + tbl(L.logits.bottom, "neg") + "</section>";
      } else {
        body += '<section><h2>Logit effects</h2><p class="muted">Not available: no model with an unembedding was loaded.</p></section>';
      }
      body += "</div>";
    }
    body += "<h2>Most similar decoder directions</h2><p>" + L.similar.map(([i, c]) =>
      '<a href="#/latent/' + i + '">' + i + "</a> (cos " + fmt(c) + ")").join(" · ") + "</p>";
    body += '<h2>Top activations</h2><ol class="examples" id="top">' + L.top.map(ex => example(ex, v, L.max)).join("") + "</ol>";
    if (L.quantiles.length) {
      body += "<h2>Examples across the activation range</h2>" + L.quantiles.map((q, qi) =>
        "<h3>Activation " + fmt(q.lo) + "–" + fmt(q.hi) + ' <span class="muted">(' + q.count.toLocaleString() +
        ' activations; a random sample)</span></h3><ol class="examples quantile">' + q.examples.map(ex => example(ex, v, L.max)).join("") + "</ol>").join("");
    }
    app().innerHTML = nav + body;
    document.title = "Latent " + L.i + " · " + d.sae.name;
  });
}

// ---------------------------------------------------------------------------------------------- routing
function render() {
  if (!S.index) { app().innerHTML = '<p class="error">data/index.js is missing: this page needs the data folder beside it.</p>'; return; }
  const m = location.hash.match(/^#\/latent\/(\d+)$/);
  S.route = m ? "latent/" + m[1] : "index";
  if (m) { renderLatent(Number(m[1])); } else {
    // #/?sort=-max&page=2: a sorted view can be linked to (and is what the sort buttons leave in the address).
    const q = new URLSearchParams(location.hash.replace(/^#\/?\??/, ""));
    const key = (q.get("sort") || "").replace(/^-/, "");
    if (COLS.some(([k, , sortable]) => sortable && k === key)) S.sort = { key, dir: q.get("sort").startsWith("-") ? -1 : 1 };
    if (q.get("page")) S.page = Math.max(0, parseInt(q.get("page"), 10) - 1 || 0);
    renderIndex();
  }
  window.scrollTo(0, 0);
}
document.addEventListener("keydown", e => {
  if (!S.route || !S.route.startsWith("latent/") || e.target.closest("input, textarea, select") || e.altKey || e.ctrlKey || e.metaKey) return;
  const a = document.getElementById(e.key === "ArrowLeft" ? "prev-latent" : e.key === "ArrowRight" ? "next-latent" : "none");
  if (a) { location.hash = a.getAttribute("href"); }
});
window.addEventListener("hashchange", render);
</script>
<script src="data/index.js"></script>
<script>render();</script>
</body>
</html>
"""
