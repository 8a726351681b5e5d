"""Report writers: the Markdown summary and a self-made SVG timeline per experiment
(no plotting library needed)."""

import math
import textwrap
from html import escape

COLORS = [  # (label, predicate, colour), stacked bottom-up
    ("2xx", lambda r: 200 <= r["status"] < 300, "#2e9d4f"),
    ("429", lambda r: r["status"] == 429, "#f0a202"),
    ("4xx", lambda r: 400 <= r["status"] < 500 and r["status"] != 429, "#8e44ad"),
    ("503", lambda r: r["status"] == 503, "#d64541"),
    ("5xx", lambda r: r["status"] >= 500 and r["status"] != 503, "#7b241c"),
    ("client error", lambda r: r["status"] == 0, "#222222"),
]
# Percentile lines. The max is drawn as dots, not a line: with the nearest-rank method the
# qth percentile of fewer than 100 / (100 - q) values IS the maximum (p99 needs 100 responses
# in a second, p90 10), so a p99 line at chaos rates (20-50 req/s) would only hide the max.
# A percentile is drawn only in the seconds that have enough responses for it.
LAT_LINES = [("p50", 50, "#1f77b4"), ("p90", 90, "#9467bd"), ("p99", 99, "#d62728")]
MAX_COLOR = "#555555"
RSS_COLOR, FDS_COLOR = "#117a8b", "#e07b00"
FAULT_FILL = "#d64541"


def _pct(values, q):
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def min_samples(q):
    """Fewest values whose nearest-rank qth percentile is not simply their maximum."""
    return max(2, math.ceil(100 / (100 - q) - 1e-9))


def _nice_ceil(v):
    """1, 2, 2.5 or 5 x 10^k at or above v (axis tops)."""
    if v <= 0:
        return 1
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return 10 * mag


def _num(v):
    return f"{v:g}"


def timeline_svg(path, title, records, ev, end, samples=None):
    """Up to three panels sharing the time axis: responses per second by status class,
    latency per second (p50/p90/p99 where estimable, max as dots), and the sampled processes'
    RSS and open fds (experiments with `sample_resources`). The fault window is drawn over
    the data, translucent, with its label on top."""
    W = 960
    left, right = 70, 170
    pw = W - left - right
    legend_x = left + pw + 46          # right of the resource panel's second axis labels
    samples = {svc: pts for svc, pts in (samples or {}).items() if pts}
    last_t = max([end] + [p["t"] for pts in samples.values() for p in pts])
    secs = max(1, int(math.ceil(last_t)))
    buckets = [[] for _ in range(secs + 1)]
    for r in records:
        # Bucketed by completion time: that is when a client sees the answer.
        t = r["t"] + (r["lat_ms"] or 0) / 1000
        buckets[min(secs, int(t))].append(r)
    x = lambda t: left + pw * t / (secs + 1)
    bw = pw / (secs + 1)

    # Title: wrapped at the drawing's width (a 15 px bold sans character is ~9 px wide on average).
    title_lines = textwrap.wrap(title, width=max(20, int((W - left - 10) / 9.5))) or [""]
    out = []
    for k, line in enumerate(title_lines):
        out.append(f'<text x="{left}" y="{22 + 19 * k}" font-size="15" font-weight="bold">{escape(line)}</text>')
    top1, h1 = 22 + 19 * (len(title_lines) - 1) + 28, 200     # responses per second
    top2, h2 = top1 + h1 + 48, 200                             # latency (log scale)
    top3, h3 = top2 + h2 + 48, 150                             # resources (optional)
    panels = [(top1, h1), (top2, h2)] + ([(top3, h3)] if samples else [])
    bottom = panels[-1][0] + panels[-1][1]
    H = bottom + 62

    # Panel 1: stacked bars.
    ymax = _nice_ceil(max([len(b) for b in buckets] + [1]))
    for i, b in enumerate(buckets):
        y = top1 + h1
        for label, pred, color in COLORS:
            n = sum(1 for r in b if pred(r))
            if n:
                hh = h1 * n / ymax
                y -= hh
                out.append(f'<rect x="{x(i) + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" height="{hh:.1f}" fill="{color}"/>')
    out += _axes(left, top1, pw, h1, secs, x, [(0, "0"), (ymax / 2, _num(ymax / 2)), (ymax, _num(ymax))], ymax,
                 "responses / s")
    for k, (label, _, color) in enumerate(COLORS):
        out.append(f'<rect x="{legend_x}" y="{top1 + 8 + 16 * k}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{legend_x + 14}" y="{top1 + 17 + 16 * k}">{escape(label)}</text>')

    # Panel 2: latency per second, log scale 0.1 ms .. 30 s.
    lo, hi = math.log10(0.1), math.log10(30000)
    y2 = lambda ms: top2 + h2 - h2 * (math.log10(min(max(ms, 0.1), 30000)) - lo) / (hi - lo)
    for ms, lab in [(0.1, "0.1ms"), (1, "1ms"), (10, "10ms"), (100, "100ms"), (1000, "1s"), (10000, "10s")]:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y2(ms):.1f}" y2="{y2(ms):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y2(ms) + 4:.1f}" text-anchor="end">{lab}</text>')
    lats = [[r["lat_ms"] for r in b if r["lat_ms"] is not None and r["status"]] for b in buckets]
    for label, q, color in LAT_LINES:
        need = min_samples(q)
        # One polyline per run of estimable seconds: a gap is a gap, not a straight line.
        runs, cur = [], []
        for i, v in enumerate(lats):
            if len(v) >= need:
                cur.append(f"{x(i) + bw / 2:.1f},{y2(_pct(v, q)):.1f}")
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        for pts in runs:
            if len(pts) == 1:
                cx, cy = pts[0].split(",")
                out.append(f'<line x1="{float(cx) - bw / 2:.1f}" x2="{float(cx) + bw / 2:.1f}" y1="{cy}" y2="{cy}" stroke="{color}" stroke-width="1.5"/>')
            else:
                out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    for i, v in enumerate(lats):
        if v:
            out.append(f'<circle cx="{x(i) + bw / 2:.1f}" cy="{y2(max(v)):.1f}" r="2.2" fill="{MAX_COLOR}"/>')
    out += _axes(left, top2, pw, h2, secs, x, [], 1, "latency (log)")
    ly = top2 + 13
    for label, q, color in LAT_LINES:
        drawn = any(len(v) >= min_samples(q) for v in lats)
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 12}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{legend_x + 16}" y="{ly + 4}">{label}</text>')
        if q > 50:
            need = min_samples(q)
            note = (["where a second has", f">= {need} responses"] if drawn
                    else ["not drawn: no second", f"had {need} responses"])
            for j, text in enumerate(note):
                out.append(f'<text x="{legend_x + 16}" y="{ly + 15 + 10 * j}" font-size="9" fill="#666">{text}</text>')
            ly += 20
        ly += 18
    out.append(f'<circle cx="{legend_x + 6}" cy="{ly}" r="2.5" fill="{MAX_COLOR}"/>'
               f'<text x="{legend_x + 16}" y="{ly + 4}">max</text>')

    # Panel 3: RSS (left axis) and open fds (right axis) of the sampled processes.
    if samples:
        rss_top = _nice_ceil(max(p["rss_mib"] for pts in samples.values() for p in pts) * 1.1)
        fds_top = _nice_ceil(max(p["fds"] for pts in samples.values() for p in pts) * 1.1)
        y3 = lambda v, top_v: top3 + h3 - h3 * v / top_v
        for frac in (0, 0.5, 1):
            yy = top3 + h3 - h3 * frac
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                       f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="{RSS_COLOR}">{_num(rss_top * frac)}</text>'
                       f'<text x="{left + pw + 6}" y="{yy + 4:.1f}" fill="{FDS_COLOR}">{_num(fds_top * frac)}</text>')
        dashes = ["", ' stroke-dasharray="5,3"', ' stroke-dasharray="2,2"']
        ly = top3 + 13
        for k, (svc, pts) in enumerate(sorted(samples.items())):
            dash = dashes[k % len(dashes)]
            for field, color, top_v in (("rss_mib", RSS_COLOR, rss_top), ("fds", FDS_COLOR, fds_top)):
                line = " ".join(f"{x(p['t']):.1f},{y3(p[field], top_v):.1f}" for p in pts)
                out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
            for field, color, lab in (("rss_mib", RSS_COLOR, "RSS MiB (left)"), ("fds", FDS_COLOR, "open fds (right)")):
                out.append(f'<line x1="{legend_x}" x2="{legend_x + 12}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
                           f'<text x="{legend_x + 16}" y="{ly + 4}">{escape(lab)}</text>')
                ly += 16
            out.append(f'<text x="{legend_x + 16}" y="{ly + 2}" font-size="9" fill="#666">{escape(svc)}, every 0.5 s</text>')
            ly += 18
        out += _axes(left, top3, pw, h3, secs, x, [], 1, "process")

    # The fault window last, over the data: translucent, its edges dashed, its label on top.
    # The same windows summary.md judges (chaos.window_bounds): the fault from inject_start
    # to remove_start (held as injected), then, fainter, the remove steps running
    # (remove_start to remove_end: being lifted, in neither window); recovery after that.
    if "inject_start" in ev and "remove_start" in ev:
        x0, x1 = x(ev["inject_start"]), x(ev["remove_start"])
        x2 = x(ev.get("remove_end", ev["remove_start"]))
        for top, h in panels:
            out.append(f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{h}" fill="{FAULT_FILL}" fill-opacity="0.13"/>')
            if x2 > x1:
                out.append(f'<rect x="{x1:.1f}" y="{top}" width="{x2 - x1:.1f}" height="{h}" fill="{FAULT_FILL}" fill-opacity="0.05"/>')
        label = f'fault {ev["inject_start"]:.1f}-{ev["remove_start"]:.1f} s'
        if "remove_end" in ev:
            label += f' (removing until {ev["remove_end"]:.1f} s)'
        # Above the panel's frame, where no bar can cover it.
        out.append(f'<text x="{x0 + 3:.1f}" y="{top1 - 6}" fill="#8b1a1a" font-weight="bold">{escape(label)}</text>')
    for key, lab, anchor, dx in (("inject_start", "inject", "start", 3), ("remove_start", "remove", "start", 3)):
        if key in ev:
            out.append(f'<line x1="{x(ev[key]):.1f}" x2="{x(ev[key]):.1f}" y1="{top1}" y2="{bottom}" stroke="#a33" stroke-dasharray="4,3"/>'
                       f'<text x="{x(ev[key]) + dx:.1f}" y="{bottom + 28}" fill="#a33" text-anchor="{anchor}">{lab} {ev[key]:.1f}s</text>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 8}" text-anchor="middle">seconds since load start (responses bucketed by completion time)</text>')
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
            f'<rect width="{W}" height="{H}" fill="white"/>']
    path.write_text("\n".join(head + out + ["</svg>"]))


def _axes(left, top, pw, h, secs, x, yticks, ymax, ylabel):
    out = [f'<rect x="{left}" y="{top}" width="{pw}" height="{h}" fill="none" stroke="#444"/>',
           f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" text-anchor="middle">{ylabel}</text>']
    for v, lab in yticks:
        yy = top + h - h * v / ymax
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{lab}</text>')
    step = 5 if secs <= 60 else 10
    for s in range(0, secs + 1, step):
        out.append(f'<line x1="{x(s):.1f}" x2="{x(s):.1f}" y1="{top + h}" y2="{top + h + 4}" stroke="#444"/>'
                   f'<text x="{x(s):.1f}" y="{top + h + 15}" text-anchor="middle">{s}</text>')
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _result(r):
    return ("PASS" if r["pass"] else "FAIL") + (" (pending)" if r.get("pending") else "")


def summary_md(meta, results):
    lines = [f"# Chaos run {meta['started']}", "",
             f"{meta['passed']}/{meta['experiments']} experiments passed; suite took {meta['duration_s']} s.", "",
             "| # | experiment | result | duration |", "|---|---|---|---|"]
    for r in results:
        # The experiment's number, from its file name ("11-storage-instance-killed" -> 11).
        num = r["name"].split("-", 1)[0]
        lines.append(f"| {num} | {r['name']} | {_result(r)} | {r.get('duration_s', '')} s |")
    for r in results:
        lines += ["", f"## {r['name']}: {_result(r)}", "", r["title"], ""]
        if r.get("pending"):
            lines += [f"Pending (does not decide the run's exit status): {r['pending']}", ""]
        if r.get("criteria_note"):
            lines += [r["criteria_note"], ""]
        if r.get("error"):
            lines += [f"**error:** `{r['error']}`", ""]
        if r.get("events"):
            lines.append("Events (s since load start): " + ", ".join(f"{k} {v}" for k, v in r["events"].items()))
            lines.append("")
        if r.get("expectations"):
            lines += ["| criterion | measured | target | n | result |", "|---|---|---|---|---|"]
            for e in r["expectations"]:
                res = "info" if e.get("informational") else ("PASS" if e["pass"] else "FAIL")
                desc = escape(e["desc"] or e["id"], quote=False).replace("|", "\\|")
                tgt = f"{e['op']} {_fmt(e['target'])}"
                lines.append(f"| {desc} | {_fmt(e['value'])} | {tgt} | {e['n']} | {res} |")
        f = r.get("figures", {})
        if f:
            lines += ["", "| phase | requests | statuses | reasons | X-Cache | p50 / p99 / max ms |", "|---|---|---|---|---|---|"]
            for w in ("steady", "fault", "removing", "recovery"):
                if w not in f:
                    continue  # a report.json from before the `removing` phase existed
                p = f[w]
                lat = p["latency_ms"]
                lines.append(f"| {w} ({p['from_s']:.1f}-{p['to_s']:.1f}s) | {p['requests']} | "
                             f"{_kv(p['status'])} | {_kv(p['reason'])} | {_kv(p['x_cache'])} | "
                             f"{_fmt(lat['p50'])} / {_fmt(lat['p99'])} / {_fmt(lat['max'])} |")
        if r.get("restore_errors"):
            lines += ["", f"restore errors: {r['restore_errors']}"]
        if r.get("chart"):
            lines += ["", f"![timeline]({r['chart']})"]
    return "\n".join(lines) + "\n"


def _kv(d):
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"
