#!/usr/bin/env python3
"""The soak's memory question in minutes, without Docker: one gateway and the simulators as
separate processes on loopback, the soak's k6 traffic (soak.js) against it, a reload every
RELOAD seconds (0: none), and a sample of the gateway's memory every SAMPLE seconds.

    python3 loadtest/soak.d/local.py BIN OUT.csv [--minutes 4] [--reload 15] [--port 18000]
                                     [--env GLIBC_TUNABLES=glibc.malloc.arena_max=1] [--rate 20]

BIN is a deltastream-gateway binary (debug or release). Ports: the gateway on PORT, its admin
listener on PORT+1000, the simulators on PORT+1 (auth), +2 (socket), +3/+13/+23 (storage,
three instances), +4 (analytics); two runs side by side need PORTs 10000 apart. The config is
chaos/gateway.toml with the upstreams on `localhost` (names, so discovery resolves them as in
the compose stack); a reload alternates the analytics upstream's timeout, as the soak's do.
No Redis: the rate limiter runs in-process.

Each CSV row: seconds since start, VmRSS / RssAnon / RssFile / VmData (KiB), threads, open
fds, reloads so far, and from /metrics: the heap glibc counts in use and free (KiB),
configuration states, upstream pipelines and runtime tasks alive. Memory figures hold on a
busy machine; latency is not measured here.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("bin")
ap.add_argument("out")
ap.add_argument("--minutes", type=float, default=4)
ap.add_argument("--reload", type=float, default=15, help="seconds between reloads; 0: none")
ap.add_argument("--port", type=int, default=18000)
ap.add_argument("--env", action="append", default=[], help="K=V for the gateway only")
ap.add_argument("--rate", default="20", help="soak.js RATE (data reads per second)")
ap.add_argument("--sample", type=float, default=5)
a = ap.parse_args()
P = a.port
work = Path(tempfile.mkdtemp(prefix="soak-local."))
cfg_path = work / "gateway.toml"
text = (ROOT / "chaos/gateway.toml").read_text()
text = text.replace("[server]\n", f"[server]\nport = {P}\n", 1)
text = re.sub(r'\[admin\]\nhost = "0.0.0.0"[^\n]*', f'[admin]\nhost = "127.0.0.1"\nport = {P + 1000}', text)
for name, offset in [("auth", 1), ("analytics", 4), ("socket", 2)]:
    text = re.sub(rf'url = "http://{name}:\d+"', f'url = "http://localhost:{P + offset}"', text)
text = re.sub(r'url = "http://storage:\d+"[^\n]*',
              "urls = [" + ", ".join(f'"http://localhost:{P + o}"' for o in (3, 13, 23)) + "]", text)
cfg_path.write_text(text)
log = open(work / "log.txt", "w")
procs = []


def start(args, env=None):
    p = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
    procs.append(p)
    return p


def http(url, method="GET", timeout=5):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except Exception as e:  # refused while starting, a timeout: no answer
        return 0, repr(e)


def metric(text, name, label=None):
    total = 0.0
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if label is None or (m.group(1) and label in m.group(1)):
            total += float(m.group(2))
    return total


def status(pid):
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmData", "Threads"):
                d[k] = int(v.split()[0])
    d["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return d


def toggle():
    t = cfg_path.read_text()
    pat = re.compile(r'(\[upstreams\.analytics\][^\[]*?\ntimeout = ")(\d+)(s")')
    cfg_path.write_text(pat.sub(lambda m: m.group(1) + ("3" if m.group(2) == "2" else "2") + m.group(3), t, 1))


k6 = None
try:
    for kind, offset in [("auth", 1), ("socket", 2), ("storage", 3), ("storage", 13), ("storage", 23), ("analytics", 4)]:
        start([a.bin, "sim", kind, "--port", str(P + offset)])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PORT", "ADMIN_PORT", "REDIS_URL", "AUTH_SERVICE_URL", "STORAGE_SERVICE_URL",
                        "ANALYTICS_SERVICE_URL", "SOCKET_SERVICE_URL")}
    env["RUST_LOG"] = "warn"
    env.update(kv.split("=", 1) for kv in a.env)
    time.sleep(1)
    gw = start([a.bin, "--config", str(cfg_path), "serve"], env)
    for _ in range(100):
        if http(f"http://127.0.0.1:{P}/health")[0] == 200:
            break
        time.sleep(0.2)
    else:
        sys.exit(f"the gateway did not answer /health (log: {work / 'log.txt'})")
    t0 = time.time()
    k6 = subprocess.Popen(
        ["k6", "run", "-q", "--no-color", str(ROOT / "loadtest/soak.d/soak.js")], stdout=log, stderr=log,
        env=dict(os.environ, BASE_URL=f"http://127.0.0.1:{P}", MINUTES=str(int(a.minutes + 0.999)),
                 T0_MS=str(int(t0 * 1000)), RATE=a.rate, SUMMARY=str(work / "k6.json")),
        start_new_session=True)
    out = open(a.out, "w")
    out.write("t,rss_kib,anon_kib,file_kib,data_kib,threads,fds,reloads,"
              "heap_in_use_kib,heap_free_kib,states,pipelines,tasks\n")
    next_reload = t0 + a.reload if a.reload else None
    next_sample, end, reloads = t0, t0 + a.minutes * 60, 0
    while time.time() < end:
        now = time.time()
        if next_reload and now >= next_reload:
            toggle()
            code, body = http(f"http://127.0.0.1:{P + 1000}/admin/reload", "POST")
            if code != 200:
                print(f"reload answered {code}: {body[:200]}", file=sys.stderr)
            reloads += 1
            next_reload += a.reload
        if now >= next_sample:
            s = status(gw.pid)
            _, m = http(f"http://127.0.0.1:{P + 1000}/metrics")
            row = [round(now - t0, 1), s["VmRSS"], s["RssAnon"], s["RssFile"], s["VmData"], s["Threads"],
                   s["fds"], reloads, int(metric(m, "gateway_heap_bytes", '"in_use"')) // 1024,
                   int(metric(m, "gateway_heap_bytes", '"free"')) // 1024,
                   int(metric(m, "gateway_config_states_alive")),
                   int(metric(m, "gateway_upstream_pipelines_alive")),
                   int(metric(m, "gateway_runtime_alive_tasks"))]
            out.write(",".join(map(str, row)) + "\n")
            out.flush()
            next_sample += a.sample
        time.sleep(0.2)
finally:
    for p in ([k6] if k6 else []) + procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in ([k6] if k6 else []) + procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
