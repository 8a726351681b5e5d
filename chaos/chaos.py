#!/usr/bin/env python3
"""Chaos runner: executes the data-file experiments in chaos/experiments/ against the running
chaos stack (chaos/run starts it), and writes chaos/reports/<timestamp>/.

Per experiment: restore a clean stack -> steady-state check -> load at a fixed arrival rate
with the fault injected after `steady_s` and removed after `fault_s` more -> recovery phase
-> expectations evaluated on the records. The fault's `remove` steps and a full restore run
in `finally`, so a failed, crashed or interrupted experiment never leaves a fault behind.

Standard library only.
"""

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
import report  # noqa: E402

PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "deltastream-chaos")
# Published on the host's 127.0.0.1 by chaos/docker-compose.chaos.yml.
PORTS = {"gateway-1": 8000, "gateway-2": 8010, "auth": 18001, "storage": 18003, "analytics": 18004}
ADMIN_PORTS = {"gateway-1": 9000, "gateway-2": 9010}
SERVICES = ["gateway-1", "gateway-2", "auth", "storage", "analytics", "redis"]
SIMS = ["auth", "storage", "analytics"]


def log(msg):
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- docker helpers

def sh(*args, check=True, timeout=60):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def container(service):
    out = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
             "--filter", f"label=com.docker.compose.service={service}")
    ids = out.split()
    if not ids:
        raise RuntimeError(f"no container for service {service} in project {PROJECT}")
    return ids[0]


def inspect(service):
    return json.loads(sh("docker", "inspect", container(service)))[0]


_network = None


def network():
    """The stack's private network (<project>_backend)."""
    global _network
    if _network is None:
        nets = inspect("gateway-1")["NetworkSettings"]["Networks"]
        names = [n for n in nets if n.endswith("_backend")]
        _network = names[0] if names else f"{PROJECT.replace('-', '')}_backend"
    return _network


def health(service):
    st = inspect(service)["State"]
    h = (st.get("Health") or {}).get("Status", "none")
    return st["Status"], h


async def wait_healthy(services, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        bad = []
        for s in services:
            status, h = await asyncio.to_thread(health, s)
            if not (status == "running" and h in ("healthy", "none")):
                bad.append(f"{s}={status}/{h}")
        if not bad:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout}s: {', '.join(bad)}")
        await asyncio.sleep(0.5)


async def http(port, method, path, body=None, headers=None, timeout=5.0):
    status, h, b = await loadgen.request_once(port, method, path, headers, body, timeout)
    try:
        parsed = json.loads(b) if b else None
    except ValueError:
        parsed = b.decode("utf-8", "replace")
    return status, h, parsed


# ---------------------------------------------------------------- fault steps

async def run_step(step, ctx):
    """One inject/remove step (data, see chaos/README.md). Returns a short description."""
    if "docker" in step:
        action, svc = step["docker"], step["service"]
        cid = await asyncio.to_thread(container, svc)
        if action == "disconnect":
            args = ["docker", "network", "disconnect", network(), cid]
        elif action == "connect":
            args = ["docker", "network", "connect", "--alias", svc, network(), cid]
        elif action == "update_cpus":
            args = ["docker", "update", "--cpus", str(step["cpus"]), cid]
        elif action in ("kill", "stop", "start", "restart", "pause", "unpause"):
            args = ["docker", action]
            if action in ("stop", "restart") and "grace_s" in step:
                args += ["-t", str(step["grace_s"])]
            if action == "kill" and "signal" in step:
                args += ["-s", step["signal"]]
            args.append(cid)
        else:
            raise ValueError(f"unknown docker action {action}")
        await asyncio.to_thread(sh, *args)
        return f"docker {action} {svc}"
    if "faults" in step:
        svc = step["faults"]
        if step.get("clear"):
            status, _, _ = await http(PORTS[svc], "DELETE", "/_faults")
        else:
            status, _, body = await http(PORTS[svc], "POST", "/_faults", body=step["set"])
        if status >= 300:
            raise RuntimeError(f"/_faults on {svc}: {status}")
        return f"faults {svc} {'clear' if step.get('clear') else json.dumps(step['set'])}"
    if "wait_healthy" in step:
        await wait_healthy(step["wait_healthy"], step.get("timeout_s", 60))
        return f"healthy {step['wait_healthy']}"
    if "sleep_s" in step:
        await asyncio.sleep(step["sleep_s"])
        return f"sleep {step['sleep_s']}"
    if "wait_metric" in step:
        # Polls the gateways' /metrics until `wait_metric{labels}` equals `value` on every
        # gateway named, then waits `settle_s` and (optionally) takes a scrape named `scrape`
        # that expectations can start from ("once the breaker is open" windows).
        name, labels, want = step["wait_metric"], step.get("labels"), float(step["value"])
        gws = step.get("gateways", list(ADMIN_PORTS))
        began = time.monotonic()
        deadline = began + step.get("timeout_s", 10)
        while True:
            texts = await asyncio.to_thread(lambda: {g: scrape(ADMIN_PORTS[g]) for g in gws})
            if all(metric_sum(t, name, labels) == want for t in texts.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}{labels} never reached {want} on {gws}")
            await asyncio.sleep(0.05)
        waited = time.monotonic() - began
        await asyncio.sleep(step.get("settle_s", 0))
        if "scrape" in step:
            await asyncio.to_thread(scrape_all, ctx, step["scrape"])
        return (f"{name}{json.dumps(labels or {})} == {step['value']} on {','.join(gws)} "
                f"after {waited:.2f} s, then settled {step.get('settle_s', 0)} s")
    raise ValueError(f"unknown step {step}")


async def restore_all():
    """Whatever an experiment did, bring every service back: unpaused, started, connected,
    no CPU cap, no /_faults, healthy. Errors are collected, not raised, so one broken step
    does not stop the rest."""
    errors = []
    for svc in SERVICES:
        try:
            info = await asyncio.to_thread(inspect, svc)
            cid = info["Id"]
            st = info["State"]
            if st.get("Paused"):
                await asyncio.to_thread(sh, "docker", "unpause", cid)
            if not st.get("Running"):
                await asyncio.to_thread(sh, "docker", "start", cid)
            if network() not in info["NetworkSettings"]["Networks"]:
                await asyncio.to_thread(sh, "docker", "network", "connect", "--alias", svc, network(), cid)
            if info["HostConfig"].get("NanoCpus"):
                await asyncio.to_thread(sh, "docker", "update", "--cpus", "0", cid)
        except Exception as e:
            errors.append(f"{svc}: {e}")
    try:
        await wait_healthy(SERVICES, 60)
    except Exception as e:
        errors.append(str(e))
    for svc in SIMS:
        try:
            await http(PORTS[svc], "DELETE", "/_faults")
        except Exception as e:
            errors.append(f"{svc} /_faults: {e}")
    return errors


async def reset_gateways():
    """Closed breakers and an empty cache on both replicas, so experiments are independent."""
    for gw, port in ADMIN_PORTS.items():
        status, _, body = await http(port, "GET", "/admin/breakers")
        ups = body.keys() if isinstance(body, dict) and "breakers" not in body else None
        names = list(ups) if ups else ["auth", "storage", "analytics"]
        for u in names:
            await http(port, "POST", f"/admin/breakers/{u}/reset")
        await http(port, "DELETE", "/admin/cache")


# ---------------------------------------------------------------- measurements

def scrape(port):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        return r.read().decode()


def scrape_all(ctx, label):
    """/metrics of every running gateway, kept as ctx["scrapes"][label], and the wall-clock
    moment as ctx["marks"][label] (the bound of access-log windows)."""
    ctx.setdefault("marks", {})[label] = time.time()
    ctx["scrapes"][label] = {g: scrape(p) for g, p in ADMIN_PORTS.items() if _alive(g)}


def metric_sum(text, name, labels=None):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        # Greedy label block: route labels contain braces ("{product}").
        m = re.match(r'^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$', line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in (labels or {}).items()):
            total += float(m.group(3))
    return total


_pids = {}


def proc_sample(service):
    """RSS (MiB) and open fds of the service's main process, read from /proc on the host.
    The pid is looked up once per container start (docker inspect is slow under load)."""
    pid = _pids.get(service)
    if not pid or not os.path.exists(f"/proc/{pid}/fd"):
        pid = _pids[service] = inspect(service)["State"]["Pid"]
    if not pid:
        return None
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": round(rss_kib / 1024, 2), "fds": fds}


class Sampler:
    """Samples process resources of some services every `every_s` while the load runs."""

    def __init__(self, services, t0, every_s=0.5):
        self.services, self.t0, self.every = services, t0, every_s
        self.samples = {s: [] for s in services}
        self.task = None

    async def loop(self):
        while True:
            for s in self.services:
                try:
                    v = await asyncio.to_thread(proc_sample, s)
                except Exception:
                    v = None
                if v:
                    v["t"] = round(time.monotonic() - self.t0, 3)
                    self.samples[s].append(v)
            await asyncio.sleep(self.every)

    def start(self):
        if self.services:
            self.task = asyncio.create_task(self.loop())

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


# ---------------------------------------------------------------- expectations

def window_bounds(name, ev, end):
    """Phase boundaries in seconds from load start. The fault window runs from the start of
    the inject steps (a `docker kill` bites while the command is still returning) to the
    start of the remove steps; recovery from the end of the remove steps to the end of the
    load."""
    return {
        "steady": (0.0, ev["inject_start"]),
        "fault": (ev["inject_start"], ev["remove_start"]),
        "recovery": (ev["remove_end"], end),
        "all": (0.0, end),
    }[name]


def select(records, sel, ev, end):
    out = records
    if "window" in sel:
        a, b = window_bounds(sel["window"], ev, end)
        a += sel.get("skip_s", 0)
        if "until_s" in sel:
            b = min(b, window_bounds(sel["window"], ev, end)[0] + sel["until_s"])
        out = [r for r in out if a <= r["t"] < b]
    return [r for r in out if matches(r, sel)]


def matches(r, m):
    if "req" in m and r["req"] not in as_list(m["req"]):
        return False
    if "target" in m and r["target"] not in as_list(m["target"]):
        return False
    if "status" in m and r["status"] not in as_list(m["status"]):
        return False
    if "not_status" in m and r["status"] in as_list(m["not_status"]):
        return False
    if "status_class" in m:
        cls = f"{r['status'] // 100}xx" if r["status"] else "error"
        if cls not in as_list(m["status_class"]):
            return False
    if "reason" in m and r["reason"] not in as_list(m["reason"]):
        return False
    if "x_cache" in m and r["x_cache"] not in as_list(m["x_cache"]):
        return False
    if "has_retry_after" in m and bool(r["retry_after"]) != m["has_retry_after"]:
        return False
    if "client_error" in m and bool(r["err"]) != m["client_error"]:
        return False
    return True


def as_list(v):
    return v if isinstance(v, list) else [v]


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def compare(value, op, target):
    if value is None:
        return False
    if op == ">=":
        return value >= target
    if op == "<=":
        return value <= target
    if op == ">":
        return value > target
    if op == "<":
        return value < target
    if op == "==":
        return value == target
    if op == "between":
        return target[0] <= value <= target[1]
    raise ValueError(f"unknown op {op}")


def access_lines(service):
    """The gateway's JSON access lines so far (`docker logs`; the gateway logs to stdout)."""
    out = sh("docker", "logs", container(service), timeout=30)
    lines = []
    for line in out.splitlines():
        if '"target":"access"' not in line:
            continue
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def evaluate(exp, records, ev, end, ctx):
    """One expectation -> {id, desc, metric, value, op, target, n, pass}."""
    kind = exp["metric"]
    sel = exp.get("select", {})
    chosen = select(records, sel, ev, end) if sel else []
    value, n, detail = None, len(chosen), None
    if kind == "share":
        if chosen:
            value = sum(1 for r in chosen if matches(r, exp["match"])) / len(chosen)
    elif kind == "count":
        value = sum(1 for r in chosen if matches(r, exp.get("match", {})))
    elif re.fullmatch(r"p\d+(\.\d+)?_ms|max_ms|min_ms", kind):
        lats = [r["lat_ms"] for r in chosen if matches(r, exp.get("match", {})) and r["lat_ms"] is not None]
        n = len(lats)
        if lats:
            value = {"max_ms": max(lats) if lats else None, "min_ms": min(lats) if lats else None}.get(
                kind) if kind in ("max_ms", "min_ms") else percentile(lats, float(kind[1:-3]))
    elif re.fullmatch(r"access_log_p\d+(\.\d+)?_ms", kind):
        # Gateway-measured latency, request by request, from the gateways' own access lines
        # written between two marks (wall clock: `from_mark`, `to_mark`), filtered on their
        # fields (`access_match`, e.g. route and the error `reason`).
        lo = ctx["marks"][exp["from_mark"]]
        hi = ctx["marks"][exp.get("to_mark", "remove_start")]
        want = exp.get("access_match", {})
        lats = []
        for g in as_list(exp.get("gateways", list(ADMIN_PORTS))):
            for line in access_lines(g):
                ts = dt.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
                if lo <= ts <= hi and all(line.get(k) in as_list(v) for k, v in want.items()):
                    lats.append(line["latency_ms"])
        n = len(lats)
        value = percentile(lats, float(kind[len("access_log_p"):-3]))
        if value is not None:
            value = round(value, 3)
        detail = {"lines": n, "max_ms": round(max(lats), 3) if lats else None,
                  "over_5ms": sum(1 for x in lats if x > 5.0)}
    elif kind == "seconds_to_first":
        # Seconds from an event to the completion of the first request matching `match`.
        t_ev = ev[exp.get("from", "remove_end")]
        done = [r["t"] + r["lat_ms"] / 1000 for r in chosen
                if matches(r, exp["match"]) and r["t"] >= t_ev - 0.0001]
        value = round(min(done) - t_ev, 3) if done else None
    elif kind == "max_in_window":
        # Most matching requests (by send time) in any sliding window of `window_s`.
        w = float(exp["window_s"])
        ts = sorted(r["t"] for r in chosen if matches(r, exp.get("match", {})))
        best, j = 0, 0
        for i in range(len(ts)):
            while ts[i] - ts[j] >= w:
                j += 1
            best = max(best, i - j + 1)
        value = best
    elif kind == "max_per_fixed_window":
        # Most matching requests (by send time) in one fixed window of `window_s`. phase
        # "epoch": windows aligned to Unix time, as the Redis limiter's (Redis TIME / window);
        # phase "any": the limiter's phase is unknown (the in-process fallback counts from
        # its own start), so the best phase (in 50 ms steps) is taken.
        w = float(exp["window_s"])
        ts = [ctx["wall0"] + r["t"] for r in chosen if matches(r, exp.get("match", {}))]
        phases = [0.0] if exp.get("phase", "epoch") == "epoch" else [k * 0.05 for k in range(int(w / 0.05))]
        best = None
        for ph in phases:
            counts = {}
            for t in ts:
                k = math.floor((t - ph) / w)
                counts[k] = counts.get(k, 0) + 1
            worst = max(counts.values()) if counts else 0
            best = worst if best is None else min(best, worst)
        value = best
    elif kind == "counter_delta":
        a, b = ctx["scrapes"][exp.get("from_scrape", "start")], ctx["scrapes"][exp.get("to_scrape", "remove_start")]
        value = sum(metric_sum(b[g], exp["counter"], exp.get("labels")) - metric_sum(a[g], exp["counter"], exp.get("labels"))
                    for g in b if g in a)
        n = 1
    elif kind == "counter_per_request":
        # Prometheus counter delta (summed over both replicas) over the fault window,
        # divided by the selected client requests.
        a, b = ctx["scrapes"][exp.get("from_scrape", "inject_end")], ctx["scrapes"][exp.get("to_scrape", "remove_start")]
        delta = sum(metric_sum(b[g], exp["counter"], exp.get("labels")) - metric_sum(a[g], exp["counter"], exp.get("labels"))
                    for g in b if g in a)
        value = round(delta / n, 4) if n else None
        detail = {"counter_delta": delta, "requests": n}
    elif kind == "histogram_share_le":
        # Gateway-side latency: share of the observations of a Prometheus histogram (summed
        # over both replicas, between two scrapes) that fell in the bucket `le`, i.e. a
        # value >= 0.99 says "p99 <= le" as measured by the gateway itself.
        a, b = ctx["scrapes"][exp.get("from_scrape", "inject_end")], ctx["scrapes"][exp.get("to_scrape", "remove_start")]
        lab = dict(exp.get("labels", {}))
        d = lambda name, extra: sum(metric_sum(b[g], name, {**lab, **extra}) - metric_sum(a[g], name, {**lab, **extra})
                                    for g in b if g in a)
        total = d(exp["histogram"] + "_count", {})
        within = d(exp["histogram"] + "_bucket", {"le": exp["le"]})
        # Observations that are not what the criterion is about (e.g. half-open probe
        # requests, which do go to the upstream): removed from the total AND, pessimistically,
        # from the fast ones, so the share is a lower bound whatever their latency was.
        excluded = 0.0
        if "exclude_counter" in exp:
            excluded = sum(metric_sum(b[g], exp["exclude_counter"], exp.get("exclude_labels")) -
                           metric_sum(a[g], exp["exclude_counter"], exp.get("exclude_labels")) for g in b if g in a)
        n = int(total - excluded)
        value = round((within - excluded) / (total - excluded), 4) if total > excluded else None
        detail = {"observations": total, "within_le": within, "excluded": excluded, "le_seconds": exp["le"]}
    elif kind == "gauge":
        text = ctx["scrapes"][exp.get("scrape", "end")]
        value = sum(metric_sum(text[g], exp["name"], exp.get("labels")) for g in as_list(exp.get("gateways", list(text))))
        n = len(text)
    elif kind == "resource":
        samples = ctx["samples"].get(exp["service"], [])
        field = exp["field"]
        base = [s[field] for s in samples if s["t"] < ev["inject_start"]]
        peak = [s[field] for s in samples]
        tail = [s[field] for s in samples if s["t"] >= end + 1.0]
        n = len(samples)
        if base and peak and tail:
            b0 = max(base)
            value = round({"peak_growth": max(peak) - b0, "end_growth": max(tail) - b0}[exp["stat"]], 2)
            detail = {"baseline": b0, "peak": max(peak), "end": max(tail)}
    else:
        raise ValueError(f"unknown metric {kind}")
    if isinstance(value, float):
        value = round(value, 4)
    min_n = exp.get("min_n", 1)
    ok = n >= min_n and compare(value, exp["op"], exp["value"])
    out = {"id": exp["id"], "desc": exp.get("desc", ""), "metric": kind, "value": value,
           "op": exp["op"], "target": exp["value"], "n": n, "pass": ok}
    if n < min_n:
        out["note"] = f"only {n} samples, need {min_n}"
    if detail:
        out["detail"] = detail
    if exp.get("informational"):
        out["informational"] = True
        out["pass"] = True
        out["met"] = ok
    return out


# ---------------------------------------------------------------- one experiment

async def setup_steps(steps, ctx):
    """Setup requests (e.g. register + login) whose answers fill {placeholders}."""
    for st in steps or []:
        body = json.loads(fill(json.dumps(st.get("body")), ctx)) if st.get("body") is not None else None
        status, _, resp = await http(PORTS[st.get("target", "gateway-1")], st.get("method", "GET"),
                                     fill(st["path"], ctx), body=body)
        if status not in as_list(st.get("expect", [200, 201])):
            raise RuntimeError(f"setup {st['path']}: {status} {resp}")
        for var, field in st.get("save", {}).items():
            ctx["vars"][var] = resp[field]


def fill(text, ctx):
    for k, v in ctx["vars"].items():
        text = text.replace("{" + k + "}", str(v))
    return text


async def steady_state(plan, ctx):
    """Every request of the plan, once per target, answers as in steady state."""
    problems = []
    for req in plan["requests"]:
        targets = req.get("targets") or ([req["target"]] if "target" in req else plan.get("targets", ["gateway-1"]))
        for t in targets:
            try:
                status, _, _ = await http(PORTS[t], req.get("method", "GET"), req["path"].replace("{i}", "0"),
                                          headers=req.get("headers"), body=req.get("body"))
            except Exception as e:
                status = f"{type(e).__name__}"
            if status not in as_list(req.get("steady_status", [200])):
                problems.append(f"{req['name']}@{t}: {status}")
    return problems


async def run_experiment(spec, outdir):
    name = spec["name"]
    log(f"=== {name}: {spec['title']}")
    ctx = {"vars": {"run": int(time.time())}, "scrapes": {}, "samples": {}}
    result = {"name": name, "title": spec["title"], "issue_item": spec.get("issue_item"),
              "criteria_note": spec.get("note"), "events": {}, "steps": [], "expectations": [],
              "restore_errors": [], "pass": False}
    started = time.monotonic()
    injected = False
    try:
        errs = await restore_all()
        if errs:
            raise RuntimeError(f"stack not restorable before the experiment: {errs}")
        await reset_gateways()
        await setup_steps(spec.get("setup"), ctx)
        plan = json.loads(fill(json.dumps(spec["load"]), ctx))
        ph = spec["phases"]
        plan["duration_s"] = ph["steady_s"] + ph["fault_s"] + ph["recovery_s"]
        # Warm caches and connections, then demand a clean steady state.
        problems = await steady_state(plan, ctx)
        if problems:
            await asyncio.sleep(1)
            problems = await steady_state(plan, ctx)
        result["steady_state_check"] = problems or "ok"
        if problems:
            raise RuntimeError(f"steady state not reached: {problems}")

        t0 = time.monotonic() + 0.2
        ctx["wall0"] = time.time() + 0.2
        ev = result["events"]
        sampler = Sampler(spec.get("sample_resources", []), t0)

        async def fault_script():
            nonlocal injected
            await asyncio.sleep(max(0, t0 + ph["steady_s"] - time.monotonic()))
            ev["inject_start"] = round(time.monotonic() - t0, 3)
            injected = True
            for st in spec["fault"]["inject"]:
                result["steps"].append({"t": round(time.monotonic() - t0, 3), "step": await run_step(st, ctx)})
            ev["inject_end"] = round(time.monotonic() - t0, 3)
            await asyncio.to_thread(scrape_all, ctx, "inject_end")
            await asyncio.sleep(max(0, t0 + ph["steady_s"] + ph["fault_s"] - time.monotonic()))
            await asyncio.to_thread(scrape_all, ctx, "remove_start")
            ev["remove_start"] = round(time.monotonic() - t0, 3)
            for st in spec["fault"]["remove"]:
                result["steps"].append({"t": round(time.monotonic() - t0, 3), "step": await run_step(st, ctx)})
            injected = False
            ev["remove_end"] = round(time.monotonic() - t0, 3)

        await asyncio.to_thread(scrape_all, ctx, "start")
        sampler.start()
        fault_task = asyncio.create_task(fault_script())
        records = await loadgen.run_load(plan, PORTS, t0)
        await fault_task
        if sampler.services:
            # Keep sampling after the load has stopped and its connections are closed: the
            # "end" resource figures are taken from there.
            await asyncio.sleep(2.5)
        await sampler.stop()
        end = plan["duration_s"]
        await asyncio.to_thread(scrape_all, ctx, "end")
        ctx["samples"] = sampler.samples
        result["load"] = {"rate": plan["rate"], "duration_s": end, "requests": len(records)}
        for exp in spec["expectations"]:
            result["expectations"].append(evaluate(exp, records, ev, end, ctx))
        result["figures"] = summarize(records, ev, end)
        result["resources"] = sampler.samples
        (outdir / f"{name}.requests.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        report.timeline_svg(outdir / f"{name}.svg", spec["title"], records, ev, end,
                            sampler.samples)
        result["chart"] = f"{name}.svg"
        result["pass"] = all(e["pass"] for e in result["expectations"])
    except (Exception, asyncio.CancelledError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"!!! {name}: {result['error']}")
        if isinstance(e, asyncio.CancelledError):
            raise
    finally:
        # ALWAYS remove the fault, then restore everything else an experiment may touch.
        if injected:
            for st in spec["fault"]["remove"]:
                try:
                    await run_step(st, ctx)
                except Exception as e:
                    result["restore_errors"].append(f"remove {st}: {e}")
        result["restore_errors"] += await restore_all()
        result["duration_s"] = round(time.monotonic() - started, 1)
        for e in result["expectations"]:
            flag = "PASS" if e["pass"] else "FAIL"
            if e.get("informational"):
                flag = "info"
            log(f"  [{flag}] {e['id']}: {e['value']} {e['op']} {e['target']} (n={e['n']})")
        log(f"=== {name}: {'PASS' if result['pass'] else 'FAIL'} in {result['duration_s']}s")
    return result


def _alive(service):
    try:
        return health(service)[0] == "running" and not inspect(service)["State"].get("Paused")
    except Exception:
        return False


def summarize(records, ev, end):
    """Per-phase figures: counts by status / reason / cache, latency percentiles."""
    out = {}
    for w in ("steady", "fault", "recovery", "all"):
        a, b = window_bounds(w, ev, end)
        rs = [r for r in records if a <= r["t"] < b]
        by_status, by_reason, by_cache, by_req = {}, {}, {}, {}
        for r in rs:
            k = str(r["status"]) if r["status"] else f"error:{r['err']}"
            by_status[k] = by_status.get(k, 0) + 1
            if r["reason"]:
                by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
            if r["x_cache"]:
                by_cache[r["x_cache"]] = by_cache.get(r["x_cache"], 0) + 1
            q = by_req.setdefault(r["req"], {})
            q[k] = q.get(k, 0) + 1
        lats = [r["lat_ms"] for r in rs if r["lat_ms"] is not None]
        out[w] = {"from_s": a, "to_s": b, "requests": len(rs), "status": by_status, "reason": by_reason,
                  "x_cache": by_cache, "by_request": by_req,
                  "latency_ms": {f"p{q}": percentile(lats, q) for q in (50, 90, 99)} | {"max": max(lats) if lats else None}}
    return out


# ---------------------------------------------------------------- main

def load_experiments(names):
    files = sorted((HERE / "experiments").glob("*.json"))
    specs = []
    for f in files:
        spec = json.loads(f.read_text())
        spec.setdefault("name", f.stem)
        spec["_file"] = f.name
        specs.append(spec)
    if not names:
        return specs
    chosen = []
    for n in names:
        hit = [s for s in specs if n in (s["name"], s["_file"], Path(s["_file"]).stem)
               or s["name"].split("-", 1)[-1] == n or s["name"].startswith(n + "-")]
        if not hit:
            raise SystemExit(f"no experiment named {n!r}; have: {', '.join(s['name'] for s in specs)}")
        chosen += [h for h in hit if h not in chosen]
    return chosen


async def main_async(args):
    specs = load_experiments(args.experiments)
    # SIGTERM behaves like Ctrl-C: the running experiment is cancelled and its finally
    # removes the fault.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.reports) / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    log(f"report: {outdir}")
    started = time.monotonic()
    results = []
    try:
        for spec in specs:
            results.append(await run_experiment(spec, outdir))
    finally:
        total = round(time.monotonic() - started, 1)
        meta = {"started": stamp, "duration_s": total, "project": PROJECT,
                "experiments": len(results), "passed": sum(1 for r in results if r["pass"])}
        (outdir / "report.json").write_text(json.dumps({"run": meta, "results": results}, indent=2))
        (outdir / "summary.md").write_text(report.summary_md(meta, results))
        log(f"{meta['passed']}/{len(specs)} experiments passed in {total}s; report in {outdir}")
    return 0 if results and all(r["pass"] for r in results) and len(results) == len(specs) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*", help="names (default: all)")
    ap.add_argument("--reports", default=str(HERE / "reports"))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for s in load_experiments([]):
            print(f"{s['name']:32} {s['title']}")
        return 0
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: faults were removed by the experiment's cleanup")
        return 130


if __name__ == "__main__":
    sys.exit(main())
