"""The dashboard at /ui: server-rendered HTML with inline SVG plots and a few lines of inline JS (the job
panel refreshes itself). No build step, no CDN, nothing fetched from elsewhere: it works offline.

Thumbnails are fetched through the backend (/ui/thumb/<project>/<task>) with the backend's own image
fetcher (its host allow-list and Label Studio token), and only for tasks in the stored queue: the
browser never sees the token, and the route never fetches a URL it is given.
"""
from __future__ import annotations

import io
import math
from html import escape

from flask import Response, abort, jsonify

from . import learning
from .images import ImageError
from .monitoring import all_projects, project_overview

THUMB_SIDE = 160
COLORS = {"accuracy": "#2563eb", "macro_f1": "#d97706", "baseline": "#059669", "kappa": "#7c3aed", "grid": "#e5e7eb"}

CSS = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;background:#f3f4f6}
body{margin:0}header{background:#111827;color:#f9fafb;padding:14px 24px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:20px;margin:0}header .meta{color:#d1d5db;font-size:14px}header a{color:#93c5fd}
main{padding:18px 24px;display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:18px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px}
section.wide{grid-column:1/-1}main>section,main>.side{align-self:start}.side{display:flex;flex-direction:column;gap:18px}h2{font-size:16px;margin:0 0 10px}p.note{color:#6b7280;font-size:12.5px;margin:6px 0}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #f0f0f0}
th{color:#6b7280;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.signal{border-radius:8px;padding:10px 14px;margin-bottom:10px;font-size:14px}
.signal.stop{background:#ecfdf5;border:1px solid #10b981}.signal.go{background:#eff6ff;border:1px solid #93c5fd}
.queue{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.task{border:1px solid #e5e7eb;border-radius:8px;padding:6px;font-size:12px;background:#fafafa}
.task img{width:100%;aspect-ratio:1;object-fit:cover;border-radius:5px;background:#e5e7eb;display:block}
.task .rank{font-weight:700;font-size:13px}.task .why{color:#4b5563}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0;font-size:14px}dl.kv dt{color:#6b7280}
.bar{height:10px;background:#e5e7eb;border-radius:5px;overflow:hidden;margin:6px 0}.bar>div{height:100%;background:#2563eb}
.state-running{color:#2563eb;font-weight:700}.state-idle{color:#059669;font-weight:700}.state-queued{color:#d97706;font-weight:700}
.error{background:#fef2f2;border:1px solid #fca5a5;border-radius:8px;padding:8px 10px;font-size:13px;margin-top:8px}
details summary{cursor:pointer;color:#374151;font-size:13px}
"""


# --- small SVG line charts -------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def line_chart(series: list[dict], *, x_label: str, y_label: str, y_range=(0.0, 1.0), width: int = 900,
               height: int = 300, threshold: float | None = None, chart_id: str = "chart") -> str:
    """An inline SVG chart. `series`: dicts with name, color, points [(x, y, tooltip)], dashed, marker
    ("circle" or "triangle"), line (draw the connecting line)."""
    left, right, top, bottom = 52, 16, 14, 42
    xs = [x for s in series for x, _, _ in s["points"]]
    x_ticks = nice_ticks(min(xs + [0]), max(xs + [1]))
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_range
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg id="{chart_id}" viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'xmlns="http://www.w3.org/2000/svg" style="max-width:{width}px;font-size:11px">']
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="{COLORS["grid"]}"/>'
                       f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" fill="#6b7280">{t:g}</text>')
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" stroke="{COLORS["grid"]}"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#6b7280">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af"/>')
    if threshold is not None and y0 <= threshold <= y1:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(threshold):.1f}" y2="{py(threshold):.1f}" '
                   f'stroke="#10b981" stroke-dasharray="2 3"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" fill="#374151">{escape(x_label)}</text>'
               f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" text-anchor="middle" fill="#374151">'
               f'{escape(y_label)}</text>')
    for s in series:
        pts = [(px(x), py(y), tip) for x, y, tip in s["points"]]
        if s.get("line", True) and len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
            dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="2.2"{dash}/>')
        for x, y, tip in pts:
            if s.get("marker") == "triangle":
                shape = (f'<polygon points="{x:.1f},{y - 6:.1f} {x - 5.5:.1f},{y + 4:.1f} {x + 5.5:.1f},{y + 4:.1f}" '
                         f'fill="{s["color"]}"')
            else:
                shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{s["color"]}"'
            out.append(f'{shape} class="pt" data-series="{escape(s["name"])}"><title>{escape(tip)}</title>'
                       f'</{"polygon" if s.get("marker") == "triangle" else "circle"}>')
    legend_x = left + 8
    for s in series:
        if not s["points"]:
            continue
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{top + 12}" y2="{top + 12}" stroke="{s["color"]}" '
                   f'stroke-width="2.2"{dash}/><text x="{legend_x + 22}" y="{top + 16}" fill="#374151">'
                   f'{escape(s["name"])}</text>')
        legend_x += 30 + 6.5 * len(s["name"])
    out.append("</svg>")
    return "".join(out)


# --- formatting ------------------------------------------------------------------------------------------

def seconds(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def page(title: str, body: str, script: str = "") -> Response:
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body>{body}{f"<script>{script}</script>" if script else ""}</body></html>')
    return Response(html, mimetype="text/html")


# --- panels ------------------------------------------------------------------------------------------------

def curve_panel(o: dict) -> str:
    lc = o["curve"]
    stop = lc["stop"]
    kappa = "" if stop["last_kappa"] is None else f' (last kappa <span id="last-kappa">{stop["last_kappa"]:.3f}</span>)'
    signal = (f'<div id="stop-signal" class="signal {"stop" if stop["stop"] else "go"}" data-stop="{int(stop["stop"])}">'
              f'<b>{"Stopping signal: more labels stopped paying off" if stop["stop"] else "Keep labeling"}</b> — '
              f'{escape(stop["reason"])}'
              f'{kappa}'
              f'</div>')
    points = lc["points"]
    if not points:
        chart = ('<p class="note" id="curve-empty">No point yet. A version gets its point when labels are submitted '
                 'after it was trained: the next training measures it on them.</p>')
    else:
        def tip(p, what):
            return (f'{p["version"]}: {what} {pct(p[what])} on {p["n_eval"]} later labels; trained on {p["n_labeled"]} '
                    f'labels in {seconds(p["train_seconds"])}')
        chart = line_chart([
            {"name": "accuracy", "color": COLORS["accuracy"], "points": [(p["n_labeled"], p["accuracy"], tip(p, "accuracy"))
                                                                          for p in lc["active"]]},
            {"name": "macro-F1", "color": COLORS["macro_f1"], "dashed": True,
             "points": [(p["n_labeled"], p["macro_f1"], tip(p, "macro_f1")) for p in lc["active"]]},
            {"name": "random-order accuracy", "color": COLORS["baseline"], "marker": "triangle",
             "points": [(p["n_labeled"], p["accuracy"], tip(p, "accuracy")) for p in lc["baseline"]]},
        ], x_label="labels the version trained on", y_label="on labels submitted after it", chart_id="curve-chart")
    rows = "".join(
        f'<tr class="curve-row" data-version="{escape(p["version"])}"><td>{escape(p["version"])}</td>'
        f'<td class="num" data-k="n_labeled">{p["n_labeled"]}</td><td class="num" data-k="n_eval">{p["n_eval"]}</td>'
        f'<td class="num" data-k="accuracy">{pct(p["accuracy"])}</td><td class="num" data-k="macro_f1">{pct(p["macro_f1"])}</td>'
        f'<td>{"random order" if p["random_order"] else escape(p["strategy"] or "")}</td>'
        f'<td class="num">{seconds(p["train_seconds"])}{" (head only)" if p.get("head_only") else ""}</td></tr>'
        for p in points)
    baseline_note = ("Triangles: versions whose queue was in random order, so the labels after them are a random "
                     "sample: an unbiased estimate (the random-order baseline)." if lc["baseline"] else
                     "No random-order baseline in this project: every measured version ranked its queue with a "
                     "strategy. (With PEAL_STRATEGY=auto, the first versions serve random order while labels are few.)")
    return (f'<section class="wide" id="curve"><h2>Is the model getting better as we label?</h2>{signal}{chart}'
            f'<p class="note">Each point: a model version, scored on the annotations submitted <i>after</i> it was '
            f'trained (labels it had not seen; "prequential" accuracy), against the number of labels it trained on. '
            f'Labels picked by an uncertainty strategy are the hard cases, so these points are pessimistic. '
            f'{baseline_note}</p>'
            f'<table id="curve-table"><tr><th>version</th><th>labels</th><th>scored on</th><th>accuracy</th>'
            f'<th>macro-F1</th><th>queue order</th><th>training time</th></tr>{rows}</table></section>')


def queue_panel(o: dict) -> str:
    age = o["queue_age"]
    cards = []
    for q in o["queue"]:
        why = [f'score {q["score"]:.3f}', escape(q["strategy"] or "")]
        if q.get("confidence") is not None:
            why.append(f'predicted {escape(str(q["predicted"]))} at {pct(q["confidence"])} (uncertainty {q["uncertainty"]:.2f})')
        if q.get("cluster") is not None:
            why.append(f'cluster {q["cluster"]}')
        cards.append(f'<div class="task" data-task="{q["task"]}" data-score="{q["score"]:.6f}">'
                     f'<img loading="lazy" src="/ui/thumb/{o["project"]}/{q["task"]}" alt="task {q["task"]}">'
                     f'<div><span class="rank">#{q["rank"]}</span> task {q["task"]}</div>'
                     f'<div class="why">{" · ".join(why)}</div></div>')
    stale = (f'{age["unseen_annotations"]} annotation event(s) since this ranking was made; the newest '
             f'{seconds(age["age_seconds"])} ago' if age["unseen_annotations"] else "the ranking has seen every annotation")
    body = "".join(cards) or ('<p class="note">No queue recorded yet: the next training orders the unlabeled tasks '
                              'and records it here.</p>' if o["latest_version"] is None or o["n_pool"] != 0 else
                              '<p class="note">Every task is labeled: nothing left to serve.</p>')
    return (f'<section id="queue"><h2>Next in Label Studio\'s queue</h2>'
            f'<p class="note">What uncertainty sampling serves next (lowest score first{", least-labeled cluster first" if any(q.get("cluster") is not None for q in o["queue"]) else ""}), '
            f'from version {escape(o["latest_version"] or "–")}; <span id="queue-age">{stale}</span>.</p>'
            f'<div class="queue">{body}</div></section>')


def job_panel(o: dict) -> str:
    j = o["job"]
    state = j.get("state") or "idle"
    rows = [("state", f'<span id="job-state" class="state-{escape(state)}">{escape(state)}</span>'
             f'{" (another one queued)" if j.get("queued") and state == "running" else ""}')]
    if j.get("running"):
        rows.append(("doing", f'<span id="job-phase" data-phase="{escape(j["phase"])}">{escape(j["words"])}</span>'))
        if j.get("step") and j.get("total"):
            rows.append(("progress", f'<div class="bar"><div style="width:{100 * j["step"] / j["total"]:.0f}%"></div></div>'))
        rows += [("elapsed", f'<span id="job-elapsed">{seconds(j["elapsed_seconds"])}</span>'),
                 ("estimated left", f'<span id="job-eta">{"–" if j["eta_seconds"] is None else "about " + seconds(j["eta_seconds"])}</span>'),
                 ("why", escape(j.get("reason") or ""))]
    rows += [("trainings", f'<span id="job-runs">{j.get("runs") or 0}</span> finished, '
                           f'<span id="job-failures">{j.get("failures") or 0}</span> failed'),
             ("last", f'<span id="job-last">{escape(j.get("last_outcome") or "none yet")}</span>'
                      f'{"" if j.get("last_duration_s") is None else " in " + seconds(j["last_duration_s"])}'
                      f'{"" if not j.get("last_finished_at") else ", at " + escape(str(j["last_finished_at"])[:19].replace("T", " ")) + " UTC"}')]
    kv = "".join(f"<dt>{k}</dt><dd style='margin:0'>{v}</dd>" for k, v in rows)
    error = (f'<div class="error" id="job-error"><b>Last error</b> ({escape(str(j.get("last_failed_at") or "")[:19].replace("T", " "))} UTC): '
             f'{escape(j["last_error"])}</div>' if j.get("last_error") else "")
    return (f'<div id="job-inner" data-version="{escape(o["latest_version"] or "")}" data-state="{escape(state)}">'
            f'<dl class="kv">{kv}</dl>{error}</div>')


def settings_panel(o: dict, settings, cache: dict) -> str:
    versions = "".join(f"<li>{escape(v)}</li>" for v in reversed(o["versions"]))
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in settings.redacted().items())
    return (f'<section id="settings"><h2>Settings, versions, caches</h2><dl class="kv">'
            f'<dt>versions kept</dt><dd style="margin:0"><span id="versions-kept">{len(o["versions"])}</span> of '
            f'PEAL_KEEP_VERSIONS={settings.keep_versions}<ul style="margin:4px 0;padding-left:18px">{versions}</ul></dd>'
            f'<dt>image cache</dt><dd style="margin:0" id="cache-images">{size(cache.get("images"))} of '
            f'{settings.image_cache_mb:g} MB</dd>'
            f'<dt>activation cache</dt><dd style="margin:0" id="cache-activations">{size(cache.get("activations"))}</dd>'
            f'<dt>model</dt><dd style="margin:0">{escape(settings.backbone)} · {escape(settings.adapter)} · strategy '
            f'{escape(settings.strategy)}</dd></dl>'
            f'<details style="margin-top:8px"><summary>All settings in force (secrets hidden)</summary>'
            f'<table>{rows}</table></details></section>')


JOB_SCRIPT = """
(function(){var pid=%d;var box=document.getElementById('job');
function tick(){fetch('/ui/'+pid+'/job',{credentials:'same-origin'}).then(function(r){return r.ok?r.text():null})
.then(function(html){if(html===null)return;var old=document.getElementById('job-inner');
var d=document.createElement('div');d.innerHTML=html;var nu=d.firstElementChild;
if(old&&nu&&nu.dataset.version!==old.dataset.version){location.reload();return}
if(old&&nu){old.replaceWith(nu)}}).catch(function(){}).finally(function(){setTimeout(tick,3000)})}
setTimeout(tick,3000)})();
"""


def register(app, settings, get_queue, get_store, get_fetcher, caches) -> None:
    def overview(pid: int) -> dict:
        return project_overview(settings, get_queue(), get_store(), pid)

    @app.get("/ui")
    def ui_index():
        store, queue = get_store(), get_queue()
        rows = []
        for pid in all_projects(queue, store):
            o = project_overview(settings, queue, store, pid)
            last = o["curve"]["points"][-1] if o["curve"]["points"] else None
            rows.append(f'<tr><td><a href="/ui/{pid}">project {pid}</a></td><td>{escape(o["latest_version"] or "–")}</td>'
                        f'<td class="num">{o["n_labeled"] if o["n_labeled"] is not None else "–"}</td>'
                        f'<td class="num">{pct(last["accuracy"]) if last else "–"}</td>'
                        f'<td>{"stop" if o["curve"]["stop"]["stop"] else "keep labeling"}</td>'
                        f'<td>{escape(o["job"]["state"] or "idle")}</td></tr>')
        table = ('<table id="projects"><tr><th>project</th><th>version</th><th>labels</th><th>last prequential accuracy</th>'
                 '<th>signal</th><th>training</th></tr>' + "".join(rows) + "</table>") if rows else \
            '<p class="note">No project yet: connect this backend to a Label Studio project.</p>'
        return page("peal-backend", f'<header><h1>peal-backend</h1><span class="meta">{escape(settings.backbone)} · '
                                    f'{escape(settings.adapter)}</span></header><main><section class="wide">'
                                    f'<h2>Projects</h2>{table}</section></main>')

    @app.get("/ui/<int:pid>")
    def ui_project(pid: int):
        o = overview(pid)
        header = (f'<header><h1>Project {pid}</h1><span class="meta">version <b id="latest-version">'
                  f'{escape(o["latest_version"] or "none yet")}</b> · <b id="n-labeled">{o["n_labeled"] if o["n_labeled"] is not None else 0}</b> labels · '
                  f'{o["n_pool"] or 0} unlabeled · strategy {escape(o["strategy"] or "–")}</span>'
                  f'<span class="meta"><a href="/ui">all projects</a> · <a href="/status/{pid}">JSON</a> · '
                  f'<a href="/metrics">metrics</a></span></header>')
        body = (header + "<main>" + curve_panel(o) + queue_panel(o) +
                f'<div class="side"><section id="job"><h2>Training job</h2>{job_panel(o)}</section>' +
                settings_panel(o, settings, caches.get()) + "</div></main>")
        return page(f"peal-backend · project {pid}", body, JOB_SCRIPT % pid)

    @app.get("/ui/<int:pid>/job")
    def ui_job(pid: int):
        return Response(job_panel(overview(pid)), mimetype="text/html")

    @app.get("/ui/thumb/<int:pid>/<int:tid>")
    def ui_thumb(pid: int, tid: int):
        store = get_store()
        latest = store.latest(pid)
        served = store.read_json(latest, learning.SERVED_FILE, []) if latest else []
        url = next((row.get("image") for row in served or [] if row.get("task") == tid), None)
        if not url:  # only tasks of the stored queue: never a URL from the request
            abort(404, description=f"task {tid} is not in project {pid}'s queue")
        try:
            image = get_fetcher().fetch(url)
        except ImageError as exc:
            return jsonify(error=f"thumbnail of task {tid}: {exc}"), 502
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=85)
        resp = Response(buf.getvalue(), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=300"
        return resp

    @app.get("/status/<int:pid>")
    def status_project(pid: int):
        return jsonify(overview(pid))
