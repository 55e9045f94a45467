"""HTML pages: an SAE's report (with its latent browser) and a sweep's page.

Both are static files that open from disk (file://) with no network and no server: styles,
scripts and charts (raysae.charts, SVG) are inline. The latent browser's data are JavaScript
files, one per `SHARD` latent ids (`latents/shard-00012.js` holds ids 3072..3327), each a call
`raysae.shard(12, {...})`, loaded on demand with a <script> element: a browser reads local
JSON with fetch() only from a server, but loads local scripts, so the page stays one double
click away and a 131,072-latent dictionary costs one small file per latent looked at. The
token index (`latents/tokens.js`) loads on the first search by token.

    OUT/index.html            the report: metrics beside the baselines, charts, latent browser
    OUT/metrics.json          everything on the page, as data
    OUT/latents/shard-*.js    per latent: frequency, activation histogram, top and random
                              contexts, logit-lens tokens (published latents; frequencies of all)
    OUT/latents/tokens.js     firing token → the published latents whose top contexts it is
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

SHARD = 256
"""Latent ids per browser data file."""

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}tr.sae td{font-weight:600;background:#eef5ff}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{max-width:100%;height:auto}
.note{color:#666;font-size:12px}#browser{border:1px solid #ccc;border-radius:6px;padding:12px}
.ctx{font:12px/1.6 ui-monospace,monospace;white-space:pre-wrap;margin:2px 0}
.ctx mark{background:#ffb347;font-weight:700}.act{display:inline-block;width:64px;color:#06c}
.chip{display:inline-block;background:#eef;border-radius:3px;padding:0 5px;margin:2px;
font:12px ui-monospace,monospace}a.lat{margin-right:8px;cursor:pointer}
th.sort{cursor:pointer}th.sort:after{content:" ⇅";color:#aaa}
"""

_BROWSER_JS = r"""
(function(){
const meta = JSON.parse(document.getElementById('latent-meta').textContent);
const shards = {}, waiting = {};
let tokens = null;
window.raysae = {
  shard(i, data){ shards[i] = data; (waiting[i] || []).forEach(f => f()); },
  tokens(t){ tokens = t; (waiting.tokens || []).forEach(f => f()); }
};
function load(src, key){
  return new Promise((resolve, reject) => {
    (waiting[key] = waiting[key] || []).push(resolve);
    const s = document.createElement('script');
    s.src = src; s.onerror = () => reject(new Error('cannot load ' + src));
    document.head.appendChild(s);
  });
}
async function shard(i){
  if (!(i in shards)) await load('latents/shard-' + String(i).padStart(5, '0') + '.js', i);
  return shards[i];
}
function el(tag, text, cls){
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function shown(tok){ return tok.replace(/\n/g, '\u21b5'); }
function context(c){
  const div = el('div', undefined, 'ctx');
  div.appendChild(el('span', c[0].toPrecision(3), 'act'));
  if (c[2] === null){ div.appendChild(el('span', 'row ' + c[1])); return div; }
  c[2].forEach((tok, j) => div.appendChild(el(j === c[3] ? 'mark' : 'span', shown(tok))));
  return div;
}
function histogram(counts){
  const max = Math.max(1, ...counts), w = 12, h = 40;
  const ns = 'http://www.w3.org/2000/svg', svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', counts.length * w); svg.setAttribute('height', h);
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, 'rect'), y = h * c / max;
    r.setAttribute('x', i * w); r.setAttribute('y', h - y);
    r.setAttribute('width', w - 1); r.setAttribute('height', y); r.setAttribute('fill', '#1f77b4');
    svg.appendChild(r);
  });
  return svg;
}
async function showLatent(id){
  const out = document.getElementById('latent');
  out.replaceChildren();
  if (!(id >= 0 && id < meta.n_latents)){
    out.appendChild(el('p', 'No latent ' + id + ': ids are 0..' + (meta.n_latents - 1) + '.'));
    return;
  }
  const data = await shard(Math.floor(id / meta.shard));
  const freq = data.freq[id % meta.shard], d = data.latents[id];
  out.appendChild(el('h3', 'Latent ' + id));
  out.appendChild(el('p', 'fires on ' + (100 * freq).toPrecision(3) + '% of the ' +
    meta.n_rows.toLocaleString() + ' scored tokens' + (freq === 0 ? ' (dead here)' : '')));
  if (!d){
    out.appendChild(el('p', 'Not published: this report details ' + meta.published +
      ' of ' + meta.n_latents + ' latents (the most frequent half and a uniform sample).', 'note'));
    return;
  }
  out.appendChild(el('p', 'max activation ' + d.max.toPrecision(4) + '; activation histogram ' +
    '(log10 from ' + meta.log_range[0] + ' to ' + meta.log_range[1] + '):', 'note'));
  out.appendChild(histogram(d.hist));
  if (d.lens){
    const p = el('p', 'logit lens (tokens its decoder row promotes): ');
    d.lens.forEach(t => p.appendChild(el('span', shown(t), 'chip')));
    out.appendChild(p);
  }
  out.appendChild(el('h4', 'Top activating contexts'));
  const top = el('div'); top.id = 'top-contexts'; out.appendChild(top);
  d.top.forEach(c => top.appendChild(context(c)));
  out.appendChild(el('h4', 'Random firing contexts'));
  const rnd = el('div'); rnd.id = 'random-contexts'; out.appendChild(rnd);
  d.random.forEach(c => rnd.appendChild(context(c)));
}
async function searchToken(text){
  if (tokens === null) await load('latents/tokens.js', 'tokens');
  const out = document.getElementById('latent');
  out.replaceChildren(el('h3', 'Latents firing most on ' + JSON.stringify(text)));
  const hits = tokens[text.trim().toLowerCase()] || [];
  if (!hits.length) out.appendChild(el('p', 'No published latent has it among its top tokens.'));
  const list = el('div'); list.id = 'token-hits'; out.appendChild(list);
  hits.forEach(h => {
    const a = el('a', 'latent ' + h[0] + ' (' + h[1] + ' of its top contexts)', 'lat');
    a.href = '#latent=' + h[0]; list.appendChild(a); list.appendChild(el('br'));
  });
}
function route(){
  const q = new URLSearchParams(location.hash.slice(1));
  if (q.has('latent')) showLatent(parseInt(q.get('latent'), 10));
  else if (q.has('token')) searchToken(q.get('token'));
}
document.getElementById('find').addEventListener('submit', ev => {
  ev.preventDefault();
  const v = document.getElementById('query').value.trim();
  location.hash = /^\d+$/.test(v) ? 'latent=' + v : 'token=' + encodeURIComponent(v);
});
window.addEventListener('hashchange', route);
const quick = document.getElementById('quick');
meta.frequent.forEach(id => {
  const a = el('a', String(id), 'lat'); a.href = '#latent=' + id; quick.appendChild(a);
});
route();
})();
"""

_SORT_JS = r"""
document.querySelectorAll('table.sortable').forEach(table => {
  table.querySelectorAll('th').forEach((th, col) => {
    th.classList.add('sort');
    th.addEventListener('click', () => {
      const body = table.tBodies[0], rows = Array.from(body.rows);
      const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir > 0 ? 'asc' : 'desc';
      const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent;
                         const n = parseFloat(t); return isNaN(n) ? t : n; };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * dir; });
      rows.forEach(r => body.appendChild(r));
    });
  });
  // #sort=COLUMN (a heading) sorts on opening: a link can share an ordering.
  const want = new URLSearchParams(location.hash.slice(1)).get('sort');
  table.querySelectorAll('th').forEach(th => { if (th.textContent === want) th.click(); });
});
"""

METRICS = (
    ("fvu", "FVU"),
    ("explained_variance", "expl. var"),
    ("fvu_b", "FVU_B (legacy)"),
    ("mse", "MSE"),
    ("cos_sim", "cos"),
    ("relative_reconstruction_bias", "rel. bias"),
    ("l0", "L0"),
    ("l1", "L1"),
    ("dead_fraction", "dead"),
    ("dense_fraction", "dense"),
)
"""The report's metric table: key, heading."""


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def page(title: str, body: str, scripts: Sequence[str] = ()) -> str:
    """A self-contained page: the house CSS, `body`, then the `scripts` inline."""
    tail = "".join(f"<script>{s}</script>" for s in scripts)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}{tail}</body></html>"
    )


def metric_table(report: dict) -> str:
    """The SAE and its baselines on the same held-out rows."""
    head = "".join(f"<th>{label}</th>" for _, label in METRICS)
    rows = [("sae", "SAE", report["sae"])] + [
        ("", name, m) for name, m in report.get("baselines", {}).items()
    ]
    body = "".join(
        f"<tr class='{cls}'><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_number(m.get(key))}</td>" for key, _ in METRICS)
        + "</tr>"
        for cls, name, m in rows
    )
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"


def _position_table(rows: Sequence[dict]) -> str:
    from raysae.positions import position_span

    keys = [
        k
        for k in ("n_tokens", "fvu", "l0", "mse", "ce_loss_increase", "kl_spliced")
        if any(k in r for r in rows)
    ]
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = "".join(
        f"<tr><td>{position_span(r)}</td>"
        + "".join(f"<td>{_number(r.get(k))}</td>" for k in keys)
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr><th>positions</th>{head}</tr></thead><tbody>{body}</tbody></table>"


def _splice_table(s: dict) -> str:
    keys = (
        "ce_clean",
        "ce_spliced",
        "ce_loss_increase",
        "ce_loss_recovered",
        "ce_loss_recovered_mean_ablation",
        "kl_spliced",
        "ce_zero_ablated",
        "ce_mean_ablated",
    )
    rows = "".join(f"<tr><td>{k}</td><td>{_number(s.get(k))}</td></tr>" for k in keys)
    return (
        f"<p>{html.escape(s['model'])} at {html.escape(s['hook'])}, "
        f"{s['n_tokens']:,} next-token predictions in {s['windows']:,} windows of "
        f"{s['context_length']} tokens of {html.escape(s['corpus'])} (BOS {s['bos']}).</p>"
        f"<table><tbody>{rows}</tbody></table>"
    )


def report_html(report: dict, charts: dict[str, str], browser: Optional[dict]) -> str:
    """The report page. charts: name → SVG (raysae.charts); browser: the latent meta (None:
    no browser)."""
    cfg = report.get("sae_config", {})
    parts = [
        f"<h1>SAE report: {html.escape(str(report.get('checkpoint', 'SAE')))}</h1>",
        f"<p class=sub>{html.escape(cfg.get('architecture', '?'))}, d_in {cfg.get('d_in')}, "
        f"{cfg.get('n_latents', 0):,} latents"
        + (f", k {cfg['k']}" if cfg.get("architecture") in ("topk", "batchtopk") else "")
        + f" · {html.escape(str(report.get('data', '')))} · {report['n_tokens']:,} tokens scored"
        f" ({html.escape(str(report.get('scored_rows', '')))}); baselines fitted on "
        f"{report.get('fit_tokens', 0):,} tokens ({html.escape(str(report.get('fit_rows', '')))})"
        "</p>",
        "<h2>Metrics beside the baselines (same held-out rows)</h2>",
        metric_table(report),
        "<p class=note>FVU = Σ‖x−x̂‖² / Σ‖x−μ‖² (1: predicting the mean). k-means is an L0 = 1 "
        "SAE; PCA is compared at the SAE's L0. FVU_B is SAELens/SAEBench's per-token mean.</p>",
    ]
    if report.get("feature_recovery"):
        rec = report["feature_recovery"]
        parts.append(
            f"<p>Toy features recovered (max cos ≥ {rec['threshold']}): "
            f"{rec['fraction_recovered']:.1%}, mean max cos {rec['mean_max_cos']:.3f}</p>"
        )
    parts.append("<h2>Latents and decoder</h2><div class=charts>")
    parts += [charts[k] for k in ("frequency", "geometry") if k in charts]
    parts.append("</div>")
    views = report.get("views", {})
    fvus = {k[: -len("/fvu")]: v for k, v in views.items() if k.endswith("/fvu")}
    if fvus:
        what = "source" if "crosscoder" in cfg.get("architecture", "") else "prefix (Matryoshka)"
        parts.append(
            f"<h2>FVU by {what}</h2><table><tr><th>view</th><th>fvu</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{_number(v)}</td></tr>" for k, v in fvus.items()
            )
            + "</table>"
        )
    if "decoder_norms" in charts:
        parts.append("<div class=charts>" + charts["decoder_norms"] + "</div>")
    positions = report.get("by_position")
    splice_positions = report.get("splice", {}).get("by_position")
    if positions or splice_positions:
        parts.append("<h2>By token position</h2><div class=charts>")
        parts += [charts[k] for k in ("positions", "splice_positions") if k in charts]
        parts.append("</div>")
        for rows in (positions and positions["buckets"], splice_positions):
            if rows:
                parts.append(_position_table(rows))
    if "splice" in report:
        parts.append("<h2>Spliced into the language model</h2>" + _splice_table(report["splice"]))
    if "training" in charts:
        parts.append("<h2>Training curves</h2><div class=charts>" + charts["training"] + "</div>")
    scripts = []
    if browser is not None:
        meta = json.dumps(browser).replace("</", "<\\/")
        parts.append(
            "<h2>Latent browser</h2><div id=browser>"
            "<form id=find><input id=query size=30 placeholder='latent id, or a token'> "
            "<button>find</button></form>"
            f"<p class=note>{browser['published']:,} of {browser['n_latents']:,} latents "
            f"detailed; contexts: {html.escape(browser['contexts'])}. Most frequent:</p>"
            "<div id=quick></div><div id=latent></div></div>"
            f"<script type=application/json id=latent-meta>{meta}</script>"
        )
        scripts.append(_BROWSER_JS)
    return page(f"SAE report {report.get('checkpoint', '')}", "".join(parts), scripts)


def write_js(path: Path, call: str, args: Sequence[Any]) -> None:
    """A browser data file: `window.raysae.<call>(*args);` (JSON arguments)."""
    text = ",".join(json.dumps(a, separators=(",", ":")) for a in args)
    path.write_text(f"window.raysae.{call}({text});\n")


def read_js(path: Path) -> list:
    """The arguments of a `write_js` file (for tools and tests reading the browser's data)."""
    text = Path(path).read_text()
    return json.loads("[" + text[text.index("(") + 1 : text.rindex(")")] + "]")


def report_charts(report: dict, history: Optional[Sequence[dict]]) -> dict[str, str]:
    """The report's charts (raysae.charts) for the sections it has."""
    from raysae import charts

    out = {
        "frequency": charts.frequency_histogram(
            report["sae"]["frequency_histogram"], report["sae_config"]["n_latents"]
        ),
        "geometry": charts.decoder_cosines(report["decoder_geometry"]),
    }
    views = report.get("views", {})
    if views.get("decoder_norms/source_1_share_histogram"):
        split = {k.split("/", 1)[1]: v for k, v in views.items() if k.startswith("decoder_norms/")}
        out["decoder_norms"] = charts.decoder_norm_shares(split)
    positions = report.get("by_position")
    if positions:
        out["positions"] = charts.by_position(
            positions["buckets"],
            f"Scored rows, windows of {positions['context_length']} (the harvest's)",
        )
    splice = report.get("splice", {})
    if splice.get("by_position"):
        out["splice_positions"] = charts.by_position(
            splice["by_position"],
            f"LM pass, windows of {splice['context_length']} tokens",
            harvest_context=report.get("harvest_context_length"),
        )
    if history:
        out["training"] = charts.training_curves(history)
    return out


def write_report(out: str | Path, report: dict, browser: Optional[dict], history) -> Path:
    """OUT/index.html and OUT/metrics.json (the browser's files are written by
    raysae.latents.publish); returns the page's path."""
    from raysae.evaluate import json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = report_html(report, report_charts(report, history), browser)
    (out / "metrics.json").write_text(
        json.dumps(json_safe({**report, "history": history}), indent=1)
    )
    (out / "index.html").write_text(page)
    return out / "index.html"


# ---------------------------------------------------------------- the sweep page

SWEEP_COLUMNS = (
    "architecture",
    "n_latents",
    "k",
    "l1_coefficient",
    "lr",
    "l0",
    "fvu",
    "explained_variance",
    "dead_fraction",
    "dense_fraction",
    "status",
    "pareto",
)
"""Columns of the sweep page's table (those the results have)."""


def sweep_html(name: str, rows: Sequence[dict], pareto_svg: str) -> str:
    """The sweep page: the labelled Pareto plot, the results table sortable by any column, each
    SAE linked to its report where it has one (row["report"], a relative link)."""
    cols = [c for c in SWEEP_COLUMNS if any(c in r for r in rows)]
    head = "".join(f"<th>{c}</th>" for c in cols) + "<th>SAE</th>"
    body = []
    for r in rows:
        cells = "".join(
            f"<td data-v='{html.escape(str(r.get(c, '')))}'>{_number(r.get(c))}</td>" for c in cols
        )
        link = (
            f"<a href='{html.escape(r['report'])}'>report</a>"
            if r.get("report")
            else html.escape(r.get("checkpoint") or "–")
        )
        body.append(f"<tr>{cells}<td>{link}</td></tr>")
    finished = sum(1 for r in rows if r.get("status") == "finished")
    body_html = (
        f"<h1>Sweep {html.escape(name)}</h1><p class=sub>{len(rows)} SAE(s), {finished} "
        "finished. Click a column heading to sort.</p>"
        f"<div class=charts>{pareto_svg}</div>"
        f"<table class=sortable><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
        "</table><p class=note>Reports: <code>raysae pages OUT/NAME --reports</code> writes "
        "one per finished SAE and links it here.</p>"
    )
    return page(f"sweep {name}", body_html, [_SORT_JS])


def point_label(row: dict) -> str:
    """What distinguishes an SAE on the Pareto plot: its k, L1 or L0 coefficient."""
    for key, name in (("k", "k"), ("l1_coefficient", "λ"), ("l0_coefficient", "λ0")):
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return f"{name}={value:g}"
    return row.get("architecture", "")


def write_sweep_page(sweep_dir: str, table=None) -> str:
    """OUT/NAME/index.html from the sweep's results (its results.parquet unless `table`, a
    DataFrame, is given), linking each SAE's report where OUT/…/report/index.html exists next
    to its checkpoint. Returns the page's location."""
    import io
    import os

    import pandas as pd

    from raysae import charts
    from raysae.data import storage

    if table is None:
        path = storage.join(sweep_dir, "results.parquet")
        if not storage.exists(path):
            raise FileNotFoundError(
                f"{path}: no results there; give the folder of a finished sweep (OUT/NAME)"
            )
        table = pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
    rows = []
    for record in table.to_dict("records"):
        record = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()
        }
        checkpoint = record.get("checkpoint")
        if checkpoint and not storage.is_s3(sweep_dir):
            page = os.path.join(
                os.path.dirname(str(checkpoint).rstrip("/")), "report", "index.html"
            )
            if os.path.exists(page):
                record["report"] = os.path.relpath(page, storage.locate(sweep_dir).path)
        rows.append(record)
    points = [
        {**r, "label": point_label(r)}
        for r in rows
        if r.get("l0") and r.get("fvu") is not None and r["l0"] > 0
    ]
    name = str(sweep_dir).rstrip("/").split("/")[-1]
    out = storage.join(sweep_dir, "index.html")
    storage.write_bytes(out, sweep_html(name, rows, charts.pareto(points)).encode())
    return out


def pages_command(sweep_dir: str, *, reports: bool = False, n_tokens: int = 65_536, log=print):
    """`raysae pages OUT/NAME`: rewrite the sweep page; with `reports`, first write the report
    of every finished SAE that has none (`raysae eval --report` on its held-out rows, next to
    its checkpoint: OUT/NAME/trials/…/m<i>/report/)."""
    import os

    import yaml

    from raysae.data import storage
    from raysae.evaluate import eval_command

    if reports:
        if storage.is_s3(sweep_dir):
            raise ValueError(
                f"{sweep_dir}: --reports writes into local folders; copy the sweep to local "
                "disk first (the page alone can be written to s3://)"
            )
        import pandas as pd

        table = pd.read_parquet(storage.join(sweep_dir, "results.parquet"))
        done = table[(table["status"] == "finished") & table["checkpoint"].notna()]
        for i, checkpoint in enumerate(done["checkpoint"], 1):
            member = os.path.dirname(str(checkpoint).rstrip("/"))
            if os.path.exists(os.path.join(member, "report", "index.html")):
                continue
            config = json.loads(Path(member, "metrics.json").read_text())["config"]
            spec = config["data"].get("uri")
            if spec is None:  # toy data: eval reads the run config's data.toy section
                run = Path(member, "report-run.yaml")
                run.write_text(yaml.safe_dump(config))
                spec = f"toy:{run}"
            log(f"report {i}/{len(done)}: {member}")
            eval_command(
                checkpoint,
                spec,
                n_tokens=n_tokens,
                report_dir=os.path.join(member, "report"),
                log=lambda line: None,
            )
    out = write_sweep_page(sweep_dir)
    log(f"wrote {out}")
    return out
