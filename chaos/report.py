"""Report writers: the Markdown summary and a self-made SVG timeline per experiment
(no plotting library needed)."""

import math
from html import escape

COLORS = [  # (label, predicate, colour), stacked bottom-up
    ("2xx", lambda r: 200 <= r["status"] < 300, "#2e9d4f"),
    ("429", lambda r: r["status"] == 429, "#f0a202"),
    ("4xx", lambda r: 400 <= r["status"] < 500 and r["status"] != 429, "#8e44ad"),
    ("503", lambda r: r["status"] == 503, "#d64541"),
    ("5xx", lambda r: r["status"] >= 500 and r["status"] != 503, "#7b241c"),
    ("client error", lambda r: r["status"] == 0, "#222222"),
]
LAT_LINES = [("p50", 50, "#1f77b4"), ("p90", 90, "#9467bd"), ("p99", 99, "#d62728"), ("max", 100, "#999999")]


def _pct(values, q):
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def timeline_svg(path, title, records, ev, end, samples=None):
    W, H = 960, 560
    left, right = 70, 120
    pw = W - left - right
    top1, h1 = 50, 200      # status codes per second
    top2, h2 = 300, 200     # latency percentiles (log scale)
    secs = max(1, int(math.ceil(end)))
    buckets = [[] for _ in range(secs + 1)]
    for r in records:
        # Bucketed by completion time: that is when a client sees the answer.
        t = r["t"] + (r["lat_ms"] or 0) / 1000
        buckets[min(secs, int(t))].append(r)
    x = lambda t: left + pw * t / (secs + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    # Fault window shading on both panels.
    if "inject_start" in ev and "remove_end" in ev:
        for top, h in ((top1, h1), (top2, h2)):
            out.append(f'<rect x="{x(ev["inject_start"]):.1f}" y="{top}" width="{x(ev["remove_end"]) - x(ev["inject_start"]):.1f}" '
                       f'height="{h}" fill="#f6d6d5" opacity="0.6"/>')
        out.append(f'<text x="{x(ev["inject_start"]) + 3:.1f}" y="{top1 + 12}" fill="#a33">fault</text>')
    # Panel 1: stacked bars.
    ymax = max([len(b) for b in buckets] + [1])
    ymax = int(math.ceil(ymax / 10.0) * 10)
    bw = pw / (secs + 1)
    for i, b in enumerate(buckets):
        y = top1 + h1
        for label, pred, color in COLORS:
            n = sum(1 for r in b if pred(r))
            if n:
                hh = h1 * n / ymax
                y -= hh
                out.append(f'<rect x="{x(i) + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" height="{hh:.1f}" fill="{color}"/>')
    out += _axes(left, top1, pw, h1, secs, x, [(0, "0"), (ymax / 2, f"{ymax // 2}"), (ymax, f"{ymax}")], ymax, "responses / s")
    for k, (label, _, color) in enumerate(COLORS):
        out.append(f'<rect x="{left + pw + 12}" y="{top1 + 8 + 16 * k}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + pw + 26}" y="{top1 + 17 + 16 * k}">{escape(label)}</text>')
    # Panel 2: latency percentiles per second, log scale 0.1 ms .. 30 s.
    lo, hi = math.log10(0.1), math.log10(30000)
    y2 = lambda ms: top2 + h2 - h2 * (math.log10(max(ms, 0.1)) - lo) / (hi - lo)
    ticks = [(0.1, "0.1ms"), (1, "1ms"), (10, "10ms"), (100, "100ms"), (1000, "1s"), (10000, "10s")]
    for ms, lab in ticks:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y2(ms):.1f}" y2="{y2(ms):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y2(ms) + 4:.1f}" text-anchor="end">{lab}</text>')
    for k, (label, q, color) in enumerate(LAT_LINES):
        pts = []
        for i, b in enumerate(buckets):
            lats = [r["lat_ms"] for r in b if r["lat_ms"] is not None]
            if lats:
                pts.append(f"{x(i) + bw / 2:.1f},{y2(_pct(lats, q)):.1f}")
        if pts:
            out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 24}" y1="{top2 + 13 + 16 * k}" y2="{top2 + 13 + 16 * k}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{left + pw + 28}" y="{top2 + 17 + 16 * k}">{label}</text>')
    out += _axes(left, top2, pw, h2, secs, x, [], 1, "latency (log)")
    for key, lab in (("inject_start", "inject"), ("remove_end", "removed")):
        if key in ev:
            out.append(f'<line x1="{x(ev[key]):.1f}" x2="{x(ev[key]):.1f}" y1="{top1}" y2="{top2 + h2}" stroke="#a33" stroke-dasharray="4,3"/>'
                       f'<text x="{x(ev[key]) + 3:.1f}" y="{top2 + h2 + 28}" fill="#a33">{lab} {ev[key]:.1f}s</text>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 8}" text-anchor="middle">seconds since load start (bucketed by response time)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


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


def summary_md(meta, results):
    lines = [f"# Chaos run {meta['started']}", "",
             f"{meta['passed']}/{meta['experiments']} experiments passed; suite took {meta['duration_s']} s.", "",
             "| # | experiment | result | duration |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.get('issue_item', '')} | {r['name']} | {'PASS' if r['pass'] else 'FAIL'} | {r.get('duration_s', '')} s |")
    for r in results:
        lines += ["", f"## {r['name']}: {'PASS' if r['pass'] else 'FAIL'}", "", r["title"], ""]
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
            for w in ("steady", "fault", "recovery"):
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
