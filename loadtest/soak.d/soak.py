#!/usr/bin/env python3
"""The soak's orchestration (run by loadtest/soak, which starts the stack first):

    python3 loadtest/soak.d/soak.py OUT_DIR CONFIG_FILE   (the gateway config the replicas mount)

Drives mixed traffic at a fixed arrival rate against both gateway replicas of the running
compose stack (one k6 per replica, loadtest/soak.d/soak.js), while on a fixed schedule:
  - every minute (at :30) the mounted gateway config is rewritten (the analytics upstream's
    timeout alternates 2s / 3s) and POST /admin/reload is sent to each replica;
  - every STORAGE_EVERY_MIN minutes (from 1:15) one storage instance is restarted, in turn;
  - once, at half-time (+15 s), Redis is restarted.
Every SAMPLE_S seconds it samples, per replica: RSS and open fds of the gateway process
(/proc on the host), established client and upstream connections (/proc/PID/net/tcp* in the
container's namespace), cache bytes and open WebSocket relays (the admin /metrics), the
request-duration histogram, and what is alive (the heap glibc counts in use and free,
configuration states, upstream pipelines and runtime tasks alive: a leak grows them, an
allocator keeping freed memory does not); and the machine: rustc processes, and the share of the two
cores used by processes other than the stack and k6.

Writes OUT_DIR/summary.md, OUT_DIR/soak.svg, OUT_DIR/results.json and exits 1 when the
target is missed (README "Soak"): after the warm-up, RSS and fds (those not held by an
established connection: how many connections k6 and the pools keep is load, not a leak) of
each replica grow by at most 5% (last minute against the first minute after warm-up,
per-minute medians) and every
later minute's p99 (k6, reads) is at most 1.5x the first minute after warm-up.
"""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "deltastream-soak")
MINUTES = int(os.environ.get("SOAK_MINUTES", "30"))
WARMUP_MIN = int(os.environ.get("SOAK_WARMUP_MIN", "2" if MINUTES >= 5 else "1"))
RATE = float(os.environ.get("SOAK_RATE", "20"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_S", "10"))
STORAGE_EVERY_MIN = float(os.environ.get("SOAK_STORAGE_EVERY_MIN", "3"))
RSS_GROWTH, FDS_GROWTH, P99_RATIO = 0.05, 0.05, 1.5
REPLICAS = {"gateway-1": {"port": 8000, "admin": 9000}, "gateway-2": {"port": 8010, "admin": 9010}}
UPSTREAM_PORTS = {8001, 8002, 8003, 8004, 6379}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args, timeout=60):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def containers(service):
    out = sh("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
             "--filter", f"label=com.docker.compose.service={service}").stdout.split()
    return sorted(out)


def all_containers():
    return sh("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()


def pid_of(cid):
    out = sh("docker", "inspect", "-f", "{{.State.Pid}}", cid).stdout.strip()
    return int(out) if out.isdigit() else 0


def http(url, method="GET", timeout=10.0):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------- what is sampled

def rss_and_fds(pid):
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return rss_kib / 1024, fds, sockets


def tcp_connections(pid, port):
    """Established connections in the process's network namespace: (client side on `port`,
    upstream side to the services and Redis)."""
    client = upstream = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    v = line.split()
                    if v[3] != "01":
                        continue
                    local, remote = int(v[1].rsplit(":", 1)[1], 16), int(v[2].rsplit(":", 1)[1], 16)
                    client += local == port
                    upstream += remote in UPSTREAM_PORTS
        except OSError:
            pass
    return client, upstream


def metric_sum(text, name, skip=None):
    total = 0.0
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if skip and m.group(1) and skip in m.group(1):
            continue
        total += float(m.group(2))
    return total


def histogram(text, name, skip):
    """Cumulative bucket counts summed over every series of `name` (series whose labels
    contain `skip` left out): {le: count}."""
    buckets = {}
    for m in re.finditer(rf"^{name}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = m.group(1)
        if skip in labels:
            continue
        le = re.search(r'le="([^"]+)"', labels).group(1)
        le = math.inf if le == "+Inf" else float(le)
        buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
    return buckets


def hist_quantile(before, after, q):
    """The q-quantile of the observations between two snapshots (linear within a bucket,
    as Prometheus' histogram_quantile)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    rank, prev_le, prev_c = q * counts[-1], 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
        prev_le, prev_c = le, c
    return None


def busy_ticks():
    with open("/proc/stat") as f:
        v = f.readline().split()
    return sum(int(v[i]) for i in (1, 2, 3, 6, 7, 8))


def proc_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def rustc_count():
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    n += f.read().strip() == "rustc"
            except OSError:
                pass
    return n


class Sampler(threading.Thread):
    def __init__(self, t0, k6_pids):
        super().__init__(daemon=True)
        self.t0, self.k6_pids, self.samples, self.halt = t0, k6_pids, [], threading.Event()
        self.gw_pids = {name: pid_of(containers(name)[0]) for name in REPLICAS}
        self.ticks = {}
        self.busy = None
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1
        self.last = time.monotonic()

    def ours(self):
        """CPU ticks of the stack's processes (every container's main process) and k6."""
        pids = list(self.k6_pids)
        ids = all_containers()
        if ids:
            out = sh("docker", "inspect", "-f", "{{.State.Pid}}", *ids).stdout.split()
            pids += [int(p) for p in out if p.isdigit() and p != "0"]
        return {pid: proc_ticks(pid) for pid in pids}

    def sample(self):
        s = {"t": round(time.time() - self.t0, 1), "rustc": rustc_count(), "replicas": {}}
        for name, r in REPLICAS.items():
            pid = self.gw_pids[name]
            row = {}
            try:
                rss, fds, sockets = rss_and_fds(pid)
                client, upstream = tcp_connections(pid, 8000)
                row.update(rss_mib=round(rss, 2), fds=fds, non_socket_fds=fds - sockets,
                           client_conns=client, upstream_conns=upstream)
            except OSError as e:
                row["proc_error"] = str(e)
            try:
                _, text = http(f"http://127.0.0.1:{r['admin']}/metrics", timeout=10)
                row["cache_bytes"] = metric_sum(text, "gateway_cache_bytes")
                row["ws_relays"] = metric_sum(text, "gateway_websocket_connections")
                row["hist"] = histogram(text, "gateway_request_duration_seconds", "/auth/")
                row["reloads_ok"] = metric_sum(text, "gateway_config_reloads_total", skip='"invalid"')
                # What is alive (issue 25 item 8): a leak grows these, the allocator does not.
                # glibc's count; absent where mimalloc serves the gateway (the default build).
                if re.search(r"^gateway_heap_bytes\{", text, re.M):
                    row["heap_in_use_mib"] = round(metric_sum(text, "gateway_heap_bytes", skip='"free"') / 2**20, 2)
                    row["heap_free_mib"] = round(metric_sum(text, "gateway_heap_bytes", skip='"in_use"') / 2**20, 2)
                row["states_alive"] = metric_sum(text, "gateway_config_states_alive")
                row["pipelines_alive"] = metric_sum(text, "gateway_upstream_pipelines_alive")
                row["tasks_alive"] = metric_sum(text, "gateway_runtime_alive_tasks")
            except Exception as e:
                row["metrics_error"] = type(e).__name__
            s["replicas"][name] = row
        now, busy, ours = time.monotonic(), busy_ticks(), self.ours()
        ours_delta = sum(max(0, t - self.ticks.get(p, 0)) for p, t in ours.items())
        wall = (now - self.last) * self.hz * self.cores
        s["others_pct"] = round(min(100.0, max(0.0, (busy - self.busy - ours_delta) / wall * 100)), 1) if wall > 0 else None
        self.ticks, self.busy, self.last = ours, busy, now
        self.samples.append(s)

    def run(self):
        # The first sample at T0, when k6's clock (the `minute` tag) starts too.
        if self.halt.wait(max(0.0, self.t0 - time.time())):
            return
        self.ticks, self.busy, self.last = self.ours(), busy_ticks(), time.monotonic()
        while not self.halt.is_set():
            try:
                self.sample()
            except Exception as e:
                log(f"sample failed: {e!r}")
            self.halt.wait(SAMPLE_S)


# ---------------------------------------------------------------- what happens on schedule

def toggle_config(path):
    """Rewrites the mounted config in place (the bind mount follows the inode, not the
    name): the analytics upstream's timeout alternates between 2s and 3s."""
    with open(path, "r+") as f:
        text = f.read()
        pat = re.compile(r'(\[upstreams\.analytics\][^\[]*?\ntimeout = ")(\d+)(s")')
        m = pat.search(text)
        if m:
            new = pat.sub(lambda m: m.group(1) + ("3" if m.group(2) == "2" else "2") + m.group(3), text, 1)
        else:
            new = text + "# soak reload\n" if not text.endswith("# soak reload\n") else text[: -len("# soak reload\n")]
        f.seek(0)
        f.write(new)
        f.truncate()


def schedule():
    end = MINUTES * 60
    ev = [(30 + 60 * k, "reload") for k in range(MINUTES) if 30 + 60 * k < end]
    t = 75.0
    while t < end - 20:
        ev.append((t, "restart storage"))
        t += STORAGE_EVERY_MIN * 60
    ev.append((end / 2 + 15, "restart redis"))
    return sorted(ev)


class Events(threading.Thread):
    def __init__(self, t0, config_path):
        super().__init__(daemon=True)
        self.t0, self.config, self.done, self.halt = t0, config_path, [], threading.Event()
        self.storage_turn = 0

    def act(self, what):
        if what == "reload":
            toggle_config(self.config)
            results = {}
            for name, r in REPLICAS.items():
                status, body = http(f"http://127.0.0.1:{r['admin']}/admin/reload", "POST")
                try:
                    changed = json.loads(body).get("changed")
                except ValueError:
                    changed = body[:200]
                results[name] = {"status": status, "changed": changed}
            ok = all(v["status"] == 200 for v in results.values())
            return ok, results
        if what == "restart storage":
            ids = containers("storage")
            cid = ids[self.storage_turn % len(ids)]
            self.storage_turn += 1
            r = sh("docker", "restart", "-t", "2", cid)
            return r.returncode == 0, {"container": cid[:12], "stderr": r.stderr.strip()}
        if what == "restart redis":
            cid = containers("redis")[0]
            r = sh("docker", "restart", "-t", "2", cid)
            return r.returncode == 0, {"container": cid[:12], "stderr": r.stderr.strip()}
        raise ValueError(what)

    def run(self):
        for at, what in schedule():
            if self.halt.wait(max(0.0, self.t0 + at - time.time())):
                return
            started = time.time()
            try:
                ok, detail = self.act(what)
            except Exception as e:
                ok, detail = False, repr(e)
            self.done.append({"t": round(started - self.t0, 1), "what": what, "ok": ok,
                              "took_s": round(time.time() - started, 2), "detail": detail})
            log(f"{what}: {'ok' if ok else 'FAILED'} {detail}")


# ---------------------------------------------------------------- analysis

def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def k6_minutes(summary_path):
    with open(summary_path) as f:
        metrics = json.load(f)["metrics"]
    out = {}
    for m in range(MINUTES):
        d = metrics.get(f"http_req_duration{{minute:{m}}}", {}).get("values", {})
        n = metrics.get(f"http_reqs{{minute:{m}}}", {}).get("values", {})
        fail = metrics.get(f"http_req_failed{{minute:{m}}}", {}).get("values", {})
        out[m] = {"p50_ms": d.get("med"), "p99_ms": d.get("p(99)"), "requests": n.get("count", 0),
                  "failed": round(fail.get("rate", 0) * n.get("count", 0))}
    total = {k: metrics.get(k, {}).get("values", {}) for k in
             ("http_reqs", "http_req_failed", "http_req_duration", "ws_sessions", "ws_subscribed",
              "ws_ticks", "ws_unexpected_closes", "ws_errors", "ws_close_unanswered",
              "dropped_iterations")}
    auth = {k: v.get("values", {}) for k, v in metrics.items() if k.startswith("http_req_duration{journey:auth")}
    return out, total, auth


def per_minute(samples, name):
    """Per replica and minute: medians of the samples taken in that minute, the last cache
    size, and the gateway's own p50/p99 from the histogram's growth over the minute."""
    rows, prev_hist = {}, None
    for m in range(MINUTES):
        inside = [s for s in samples if m * 60 <= s["t"] < (m + 1) * 60 and name in s["replicas"]]
        vals = [s["replicas"][name] for s in inside]
        row = {"samples": len(vals)}
        for k in ("rss_mib", "fds", "non_socket_fds", "client_conns", "upstream_conns", "ws_relays",
                  "heap_in_use_mib", "heap_free_mib", "tasks_alive"):
            row[k] = median([v.get(k) for v in vals])
        # The fds no established connection holds: k6 opens more client connections when
        # answers slow down (a Redis restart) and keeps them, and the upstream pools keep what
        # they opened meanwhile; neither is a leak. A socket the gateway failed to close
        # (CLOSE_WAIT, or never connected) or any other descriptor still counts here.
        row["fds_unconnected"] = median([
            v["fds"] - v["client_conns"] - v["upstream_conns"] for v in vals
            if None not in (v.get("fds"), v.get("client_conns"), v.get("upstream_conns"))])
        row["cache_bytes"] = vals[-1].get("cache_bytes") if vals else None
        # The most seen in the minute: a replaced state or pipeline alive for longer than
        # its requests would show in every sample.
        for k in ("states_alive", "pipelines_alive"):
            row[k] = max([v[k] for v in vals if v.get(k) is not None], default=None)
        hists = [v["hist"] for v in vals if v.get("hist")]
        if hists:
            start = prev_hist or {}
            row["gw_p50_ms"] = (hist_quantile(start, hists[-1], 0.5) or 0) * 1000
            row["gw_p99_ms"] = (hist_quantile(start, hists[-1], 0.99) or 0) * 1000
            prev_hist = hists[-1]
        row["others_pct"] = median([s.get("others_pct") for s in inside])
        row["rustc_max"] = max([s["rustc"] for s in inside], default=0)
        rows[m] = row
    return rows


def judge(minutes, k6):
    """Growth of RSS and fds (last minute against the first after warm-up) and the p99 of
    every minute after it against that first one."""
    first, last = WARMUP_MIN, MINUTES - 1
    verdicts = []
    if last <= first:
        return [("run too short to judge", False, f"{MINUTES} min with a {WARMUP_MIN}-min warm-up")]

    def growth(key, limit, label):
        a, b = minutes[first].get(key), minutes[last].get(key)
        if not a or b is None:
            verdicts.append((label, False, "no samples"))
            return
        g = b / a - 1
        verdicts.append((label, g <= limit, f"{a:g} -> {b:g} ({g * 100:+.1f}%, limit +{limit * 100:g}%)"))

    growth("rss_mib", RSS_GROWTH, "RSS growth")
    growth("fds_unconnected", FDS_GROWTH, "open fds growth (not held by an established connection)")
    base = k6[first]["p99_ms"]
    worst = max(((k6[m]["p99_ms"] or 0, m) for m in range(first + 1, last + 1)), default=(0, first))
    if base:
        verdicts.append(("p99 within 1.5x of the first minute after warm-up", worst[0] <= P99_RATIO * base,
                         f"first {base:.1f} ms (minute {first + 1}), worst {worst[0]:.1f} ms "
                         f"(minute {worst[1] + 1}, {worst[0] / base:.2f}x)"))
    else:
        verdicts.append(("p99 within 1.5x", False, "no requests in the first minute after warm-up"))
    return verdicts


# ---------------------------------------------------------------- the chart (SVG by hand)

COLORS = {"gateway-1": "#1f77b4", "gateway-2": "#d62728"}


def svg_chart(samples, k6, events, path):
    panels = [("RSS (MiB)", lambda r: r.get("rss_mib")),
              ("open fds", lambda r: r.get("fds")),
              ("client / upstream connections", None),
              ("p99 per minute (ms, k6 reads)", None)]
    W, H, PAD_L, PAD_R, PAD_T, GAP = 900, 190, 60, 20, 30, 40
    total_h = PAD_T + len(panels) * (H + GAP)
    end = MINUTES * 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{total_h}" fill="white"/>',
           f'<text x="{PAD_L}" y="18" font-size="13">Soak: {MINUTES} min, both replicas '
           f'(blue gateway-1, red gateway-2); dashed: reload (grey), storage restart (orange), '
           f'Redis restart (purple); shaded: warm-up</text>']

    def x_of(t):
        return PAD_L + (W - PAD_L - PAD_R) * t / end

    for i, (title, get) in enumerate(panels):
        top = PAD_T + i * (H + GAP) + 15
        series = []
        if i < 2:
            for name in REPLICAS:
                series.append((name, [(s["t"], get(s["replicas"].get(name, {}))) for s in samples], ""))
        elif i == 2:
            for name in REPLICAS:
                series.append((name, [(s["t"], s["replicas"].get(name, {}).get("client_conns")) for s in samples], ""))
                series.append((name, [(s["t"], s["replicas"].get(name, {}).get("upstream_conns")) for s in samples], "4,3"))
        else:
            for name in REPLICAS:
                series.append((name, [(m * 60 + 30, k6[name][m]["p99_ms"]) for m in range(MINUTES)], ""))
        ys = [y for _, pts, _ in series for _, y in pts if y is not None]
        lo, hi = (min(ys), max(ys)) if ys else (0, 1)
        lo = 0 if i >= 2 else lo * 0.95
        hi = hi * 1.05 if hi > lo else lo + 1

        def y_of(v):
            return top + H - H * (v - lo) / (hi - lo)

        out.append(f'<text x="{PAD_L}" y="{top - 5}" font-size="12">{title}</text>')
        out.append(f'<rect x="{x_of(0)}" y="{top}" width="{x_of(WARMUP_MIN * 60) - x_of(0):.1f}" '
                   f'height="{H}" fill="#eee"/>')
        out.append(f'<rect x="{PAD_L}" y="{top}" width="{W - PAD_L - PAD_R}" height="{H}" fill="none" stroke="#999"/>')
        for frac in (0, 0.5, 1):
            v = lo + (hi - lo) * frac
            out.append(f'<text x="{PAD_L - 5}" y="{y_of(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
        for m in range(0, MINUTES + 1, max(1, MINUTES // 10)):
            out.append(f'<text x="{x_of(m * 60):.1f}" y="{top + H + 13}" text-anchor="middle">{m}m</text>')
        for e in events:
            color = {"reload": "#aaa", "restart storage": "#ff7f0e", "restart redis": "#9467bd"}[e["what"]]
            out.append(f'<line x1="{x_of(e["t"]):.1f}" x2="{x_of(e["t"]):.1f}" y1="{top}" y2="{top + H}" '
                       f'stroke="{color}" stroke-dasharray="3,3"/>')
        for name, pts, dash in series:
            d = " ".join(f"{x_of(t):.1f},{y_of(y):.1f}" for t, y in pts if y is not None)
            if d:
                out.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[name]}" stroke-width="1.5"'
                           + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


# ---------------------------------------------------------------- the report

def fmt(v, spec="g"):
    return "-" if v is None else format(v, spec)


def report(out_dir, samples, events, k6, k6_total, k6_auth, minutes, verdicts, meta):
    ok = all(met for checks in verdicts.values() for _, met, _ in checks)
    others = [s["others_pct"] for s in samples if s.get("others_pct") is not None]
    rustc = [s["rustc"] for s in samples]
    lines = [f"# Soak {meta['stamp']}: {'TARGET MET' if ok else 'TARGET MISSED'}", "",
             f"- {MINUTES} min (`SOAK_MINUTES`), warm-up {WARMUP_MIN} min, sampled every {SAMPLE_S:g} s; "
             f"image `{meta['image']}`, commit `{meta['commit']}`",
             f"- load per replica (k6, fixed arrival rate): data_anon {RATE:g}/s, data_auth {RATE / 4:g}/s "
             f"(2 requests), analytics {RATE / 4:g}/s, register + login every 4 s, a WebSocket subscriber "
             f"joining every 2 s and leaving after 30 s",
             f"- events: {sum(e['what'] == 'reload' for e in events)} reloads (each replica), "
             f"{sum(e['what'] == 'restart storage' for e in events)} storage restarts, "
             f"{sum(e['what'] == 'restart redis' for e in events)} Redis restart; "
             f"failed: {sum(not e['ok'] for e in events)}",
             f"- machine: rustc processes seen in {sum(1 for r in rustc if r)} of {len(rustc)} samples "
             f"(max {max(rustc, default=0)}); other processes used {fmt(median(others), '.0f')}% of the "
             f"{os.cpu_count()} cores (median of samples; range {fmt(min(others, default=None), '.0f')}-"
             f"{fmt(max(others, default=None), '.0f')}%)"
             + (": latency figures are VOID by GUIDE section 7 (memory and fds are not CPU figures)"
                if any(rustc) else ""),
             "", "## Verdict per replica", "", "| replica | check | met | figures |", "|---|---|---|---|"]
    for name, vs in verdicts.items():
        for label, met, text in vs:
            lines.append(f"| {name} | {label} | {'yes' if met else '**no**'} | {text} |")
    lines += ["", "## Per minute", "",
              "Medians of the minute's samples; cache bytes at its last sample; p50/p99 in ms from "
              "k6 (reads: data and analytics journeys; auth journey apart) and from the gateway's "
              "own histogram (all routes but /auth/, bucket-interpolated); others % = CPU share of "
              "processes outside the stack and k6; heap in use / free: glibc's count of what the "
              "program holds and what malloc keeps freed (`-`: a build where mimalloc serves the program); states, pipelines: configuration states "
              "and upstream pipelines alive (most in the minute; 1 and 4 when nothing replaced "
              "is kept); tasks: the runtime's tasks alive.", "",
              "| replica | min | RSS MiB | fds | non-socket fds | client conns | upstream conns | WS relays "
              "| cache bytes | heap in use MiB | heap free MiB | states | pipelines | tasks "
              "| requests | failed | k6 p50 | k6 p99 | gw p50 | gw p99 | others % | rustc |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in REPLICAS:
        for m in range(MINUTES):
            r, k = minutes[name][m], k6[name][m]
            lines.append(
                f"| {name} | {m + 1}{' (warm-up)' if m < WARMUP_MIN else ''} | {fmt(r['rss_mib'], '.1f')} | "
                f"{fmt(r['fds'])} | {fmt(r['non_socket_fds'])} | {fmt(r['client_conns'])} | "
                f"{fmt(r['upstream_conns'])} | {fmt(r['ws_relays'])} | {fmt(r['cache_bytes'], '.0f')} | "
                f"{fmt(r['heap_in_use_mib'], '.2f')} | {fmt(r['heap_free_mib'], '.2f')} | "
                f"{fmt(r['states_alive'])} | {fmt(r['pipelines_alive'])} | {fmt(r['tasks_alive'])} | "
                f"{k['requests']} | {k['failed']} | {fmt(k['p50_ms'], '.1f')} | {fmt(k['p99_ms'], '.1f')} | "
                f"{fmt(r.get('gw_p50_ms'), '.1f')} | {fmt(r.get('gw_p99_ms'), '.1f')} | "
                f"{fmt(r['others_pct'], '.0f')} | {r['rustc_max']} |")
    lines += ["", "## Whole run (k6)", "", "| replica | requests | failed | p50 ms | p99 ms | auth journey p99 ms "
              "| WS sessions | subscribed | ticks | unexpected closes | WS errors | close unanswered | dropped iterations |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in REPLICAS:
        t = k6_total[name]
        auth = next(iter(k6_auth[name].values()), {})
        lines.append(
            f"| {name} | {t['http_reqs'].get('count', 0)} | {round(t['http_req_failed'].get('rate', 0) * t['http_reqs'].get('count', 0))} | "
            f"{fmt(t['http_req_duration'].get('med'), '.1f')} | {fmt(t['http_req_duration'].get('p(99)'), '.1f')} | "
            f"{fmt(auth.get('p(99)'), '.0f')} | {t['ws_sessions'].get('count', 0)} | {t['ws_subscribed'].get('count', 0)} | "
            f"{t['ws_ticks'].get('count', 0)} | {t['ws_unexpected_closes'].get('count', 0)} | {t['ws_errors'].get('count', 0)} | "
            f"{t['ws_close_unanswered'].get('count', 0)} | {t['dropped_iterations'].get('count', 0)} |")
    lines += ["", "## Events", "", "| at s | what | ok | took s | detail |", "|---:|---|---|---:|---|"]
    for e in events:
        lines.append(f"| {e['t']} | {e['what']} | {'yes' if e['ok'] else '**no**'} | {e['took_s']} | "
                     f"`{json.dumps(e['detail'])[:160]}` |")
    lines += ["", "Chart: `soak.svg`; every sample: `results.json`; k6 summaries: `k6-gateway-*.json`.", ""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    return ok


def main():
    out_dir = Path(sys.argv[1]).resolve()
    config = Path(sys.argv[2]).resolve()
    for name in REPLICAS:
        if not containers(name):
            sys.exit(f"{name} of project {PROJECT} is not running (loadtest/soak starts the stack)")
    t0 = time.time() + 2
    procs = {}
    for name, r in REPLICAS.items():
        env = dict(os.environ, BASE_URL=f"http://127.0.0.1:{r['port']}", MINUTES=str(MINUTES),
                   T0_MS=str(int(t0 * 1000)), RATE=str(RATE), SUMMARY=str(out_dir / f"k6-{name}.json"))
        procs[name] = subprocess.Popen(["k6", "run", "--quiet", "--no-color", str(HERE / "soak.js")],
                                       cwd=ROOT, env=env, stdout=open(out_dir / f"k6-{name}.log", "wb"),
                                       stderr=subprocess.STDOUT)
    log(f"k6 started for {', '.join(REPLICAS)}: {MINUTES} min; schedule: "
        + ", ".join(f"{what} @{at:g}s" for at, what in schedule()))
    sampler = Sampler(t0, [p.pid for p in procs.values()])
    events = Events(t0, config)
    sampler.start()
    events.start()
    deadline = t0 + MINUTES * 60 + 120
    rc = {}
    try:
        for name, p in procs.items():
            try:
                rc[name] = p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc[name] = "killed (did not finish in time)"
    finally:
        events.halt.set()
        sampler.halt.set()
        sampler.join(timeout=30)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    log(f"k6 finished: {rc}")
    k6, k6_total, k6_auth, minutes, verdicts = {}, {}, {}, {}, {}
    for name in REPLICAS:
        k6[name], k6_total[name], k6_auth[name] = k6_minutes(out_dir / f"k6-{name}.json")
        minutes[name] = per_minute(sampler.samples, name)
        verdicts[name] = judge(minutes[name], k6[name])
    meta = {"stamp": out_dir.name, "image": os.environ.get("GATEWAY_IMAGE", "deltastream-gateway:local"),
            "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").stdout.strip(),
            "k6_exit": rc}
    for s in sampler.samples:
        for r in s["replicas"].values():
            r.pop("hist", None)
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "minutes": minutes, "k6": k6, "events": events.done, "samples": sampler.samples,
         "verdicts": verdicts}, indent=1, default=str))
    svg_chart(sampler.samples, k6, events.done, out_dir / "soak.svg")
    ok = report(out_dir, sampler.samples, events.done, k6, k6_total, k6_auth, minutes, verdicts, meta)
    ok = ok and all(e["ok"] for e in events.done)
    print((out_dir / "summary.md").read_text())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
