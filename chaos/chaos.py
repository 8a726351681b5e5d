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
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
import report  # noqa: E402
import wsclient  # noqa: E402

PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "deltastream-chaos")
# Published on the host's 127.0.0.1 by chaos/docker-compose.chaos.yml. The simulators' ports
# (their /_faults) are looked up per container (sim_ports): storage runs as several instances,
# each on an ephemeral loopback port.
ADMIN_PORTS = {"gateway-1": 9000, "gateway-2": 9010}
# Load targets: the public listeners, and the admin listeners as "<gateway>-admin" (/ready).
PORTS = {"gateway-1": 8000, "gateway-2": 8010,
         **{f"{g}-admin": p for g, p in ADMIN_PORTS.items()}}
SERVICES = ["gateway-1", "gateway-2", "auth", "storage", "analytics", "socket", "redis"]
SIM_PORTS = {"auth": 8001, "socket": 8002, "storage": 8003, "analytics": 8004}
SIMS = list(SIM_PORTS)
# Instances per service in the clean stack (docker-compose.yml's `scale`); restore_all
# scales back to these after an experiment that scaled (14).
SCALE = {"storage": 3}


def log(msg):
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- docker helpers

def sh(*args, check=True, timeout=60):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def split_service(service):
    """"storage" -> ("storage", None): every instance; "storage#2" -> ("storage", 2): the
    instance compose numbered 2 (label com.docker.compose.container-number)."""
    name, _, num = service.partition("#")
    return name, int(num) if num else None


def containers(service):
    """Container ids of a service (every instance, by number), or of one instance ("storage#2")."""
    name, num = split_service(service)
    args = ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={name}"]
    if num is not None:
        args += ["--filter", f"label=com.docker.compose.container-number={num}"]
    ids = sh(*args).split()
    if not ids:
        raise RuntimeError(f"no container for service {service} in project {PROJECT}")
    if len(ids) > 1:
        nums = [int(x) for x in sh("docker", "inspect", "-f",
                                   '{{index .Config.Labels "com.docker.compose.container-number"}}',
                                   *ids).split()]
        ids = [i for _, i in sorted(zip(nums, ids))]
    return ids


def container(service):
    return containers(service)[0]


def instance_ip(cid):
    """The container's address on the stack's network (what the gateway's instance is named
    after: `IP:port`), or None when it is not attached."""
    nets = json.loads(sh("docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", cid))
    return (nets.get(network()) or {}).get("IPAddress") or None


def sim_ports(service):
    """Published loopback ports of a simulator's /_faults: one per running instance."""
    name, _ = split_service(service)
    out = []
    for cid in containers(service):
        info = json.loads(sh("docker", "inspect", cid))[0]
        binding = (info["NetworkSettings"].get("Ports") or {}).get(f"{SIM_PORTS[name]}/tcp") or []
        if binding:
            out.append(int(binding[0]["HostPort"]))
    return out


def kernel_cpu_quota(cid):
    """The CPU quota the kernel enforces on a container, in microseconds per period (-1: no
    cap), read from its cgroup; None when no cgroup file is found. This, not `docker
    inspect`, is the truth: on Docker 20.10 with cgroup v1, `docker update --cpus 0` leaves
    the cap in place (NanoCpus and cpu.cfs_quota_us unchanged), and after `--cpu-quota -1`
    lifts it, NanoCpus still reads the old value."""
    for path in (f"/sys/fs/cgroup/cpu/docker/{cid}/cpu.cfs_quota_us",
                 f"/sys/fs/cgroup/cpu,cpuacct/docker/{cid}/cpu.cfs_quota_us"):
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    # cgroup v2: "max 100000" or "5000 100000".
    for path in (f"/sys/fs/cgroup/docker/{cid}/cpu.max",
                 f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.max"):
        try:
            with open(path) as f:
                quota = f.read().split()[0]
            return -1 if quota == "max" else int(quota)
        except (OSError, ValueError, IndexError):
            pass
    return None


def cpu_capped(info):
    """Whether a container (its `docker inspect` entry) runs under a CPU cap: the kernel's
    quota when readable, else the inspect fields (which may report a lifted cap as still set,
    so at worst the cap is lifted once more)."""
    quota = kernel_cpu_quota(info["Id"])
    if quota is not None:
        return quota > 0
    host = info["HostConfig"]
    if (host.get("CpuQuota") or 0) > 0:
        return True
    return bool(host.get("NanoCpus")) and host.get("CpuQuota") != -1


def uncap_cpu(cid):
    """Lifts a container's CPU cap for real: `--cpu-quota -1` (`--cpus 0` does not, see
    kernel_cpu_quota), then checks the kernel agrees."""
    sh("docker", "update", "--cpu-quota", "-1", cid)
    quota = kernel_cpu_quota(cid)
    if quota is not None and quota > 0:
        raise RuntimeError(f"CPU cap still in place after --cpu-quota -1 (cfs quota {quota} us)")


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


def compose_scale(service, n):
    """`compose up --scale SERVICE=n` for that service alone (no dependencies, no recreation
    of the instances that stay); scaling down stops and removes the highest-numbered ones."""
    sh(*compose_cmd(), "up", "-d", "--no-deps", "--no-recreate", "--no-build", "-t", "2",
       "--scale", f"{service}={n}", service, timeout=120)


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
    """(status, health) of each instance of the service."""
    out = []
    for info in json.loads(sh("docker", "inspect", *containers(service))):
        st = info["State"]
        out.append((st["Status"], (st.get("Health") or {}).get("Status", "none")))
    return out


async def wait_healthy(services, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        bad = []
        for s in services:
            for k, (status, h) in enumerate(await asyncio.to_thread(health, s)):
                if not (status == "running" and h in ("healthy", "none")):
                    bad.append(f"{s}[{k}]={status}/{h}")
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
        # "storage" acts on every instance at once (the service as a whole: killed,
        # restarted, partitioned), "storage#2" on that instance alone.
        action, svc = step["docker"], step["service"]
        alias = split_service(svc)[0]
        cids = await step_containers(ctx, svc)

        def args_for(cid):
            if action == "disconnect":
                return ["docker", "network", "disconnect", network(), cid]
            if action == "connect":
                return ["docker", "network", "connect", "--alias", alias, network(), cid]
            if action == "update_cpus":
                # `cpus: 0` means "no cap": `--cpus 0` would leave the current one in place.
                if float(step["cpus"]) <= 0:
                    return ["docker", "update", "--cpu-quota", "-1", cid]
                if "period_us" in step:
                    # A short CFS period: a container at its quota waits at most one period
                    # (the default 100 ms period would stall every answer, /health too, by up
                    # to 100 ms, whatever the process does).
                    period = int(step["period_us"])
                    return ["docker", "update", "--cpu-period", str(period),
                            "--cpu-quota", str(max(1000, int(float(step["cpus"]) * period))), cid]
                return ["docker", "update", "--cpus", str(step["cpus"]), cid]
            if action in ("kill", "stop", "start", "restart", "pause", "unpause"):
                args = ["docker", action]
                if action in ("stop", "restart") and "grace_s" in step:
                    args += ["-t", str(step["grace_s"])]
                if action == "kill" and "signal" in step:
                    args += ["-s", step["signal"]]
                return args + [cid]
            raise ValueError(f"unknown docker action {action}")
        await asyncio.gather(*(asyncio.to_thread(sh, *args_for(c)) for c in cids))
        if action == "update_cpus" and float(step["cpus"]) <= 0:
            for c in cids:
                quota = await asyncio.to_thread(kernel_cpu_quota, c)
                if quota is not None and quota > 0:
                    raise RuntimeError(f"{svc}: CPU cap still in place (cfs quota {quota} us)")
        if action in ("start", "restart", "connect"):
            ctx.get("sim_ports", {}).pop(svc, None)  # a restarted container may get another host port
        return f"docker {action} {svc}" + (f" ({len(cids)} instances)" if len(cids) > 1 else "")
    if "scale" in step:
        svc, n = step["scale"], int(step["n"])
        await asyncio.to_thread(compose_scale, svc, n)
        for cache in ("cids", "sim_ports"):
            for k in [k for k in ctx.get(cache, {}) if split_service(k)[0] == svc]:
                del ctx[cache][k]
        await asyncio.to_thread(record_ips, ctx, svc, None)
        # When each instance's container started (compose itself takes seconds to return
        # after starting them): "new instances take traffic within ..." counts from there.
        for cid in await asyncio.to_thread(containers, svc):
            num, started = (await asyncio.to_thread(
                sh, "docker", "inspect", "-f",
                '{{index .Config.Labels "com.docker.compose.container-number"}} {{.State.StartedAt}}', cid)).split()
            ts = dt.datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", started).replace("Z", "+00:00")).timestamp()
            ctx.setdefault("started_at", {})[f"{svc}#{num}"] = round(ts - ctx["wall0"], 3)
        return f"scale {svc}={n}"
    if "faults" in step:
        svc = step["faults"]
        ports = ctx.get("sim_ports", {}).get(svc) or await asyncio.to_thread(sim_ports, svc)
        if not ports:
            raise RuntimeError(f"/_faults on {svc}: no published port")

        async def one(port):
            if step.get("clear"):
                status, _, _ = await http(port, "DELETE", "/_faults")
            else:
                status, _, _ = await http(port, "POST", "/_faults", body=step["set"])
            if status >= 300:
                raise RuntimeError(f"/_faults on {svc} (port {port}): {status}")
        # Every instance at once: the fault starts within milliseconds of inject_start.
        await asyncio.gather(*(one(p) for p in ports))
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
    """Whatever an experiment did, bring every service back: its usual number of instances,
    unpaused, started, connected, no CPU cap, no /_faults, healthy. Errors are collected, not
    raised, so one broken step does not stop the rest."""
    errors = []
    for svc, n in SCALE.items():
        try:
            have = len(await asyncio.to_thread(containers, svc))
        except Exception:
            have = 0
        if have != n:
            try:
                await asyncio.to_thread(compose_scale, svc, n)
            except Exception as e:
                errors.append(f"scale {svc}={n}: {e}")
    for svc in SERVICES:
        try:
            cids = await asyncio.to_thread(containers, svc)
            infos = json.loads(await asyncio.to_thread(sh, "docker", "inspect", *cids))
        except Exception as e:
            errors.append(f"{svc}: {e}")
            continue
        for info in infos:
            try:
                cid = info["Id"]
                st = info["State"]
                if st.get("Paused"):
                    await asyncio.to_thread(sh, "docker", "unpause", cid)
                if not st.get("Running"):
                    await asyncio.to_thread(sh, "docker", "start", cid)
                if network() not in info["NetworkSettings"]["Networks"]:
                    await asyncio.to_thread(sh, "docker", "network", "connect", "--alias", svc, network(), cid)
                if cpu_capped(info):
                    await asyncio.to_thread(uncap_cpu, cid)
            except Exception as e:
                errors.append(f"{svc} {info.get('Name')}: {e}")
    try:
        await wait_healthy(SERVICES, 60)
    except Exception as e:
        errors.append(str(e))
    for svc in SIMS:
        try:
            for port in await asyncio.to_thread(sim_ports, svc):
                await http(port, "DELETE", "/_faults")
        except Exception as e:
            errors.append(f"{svc} /_faults: {e}")
    return errors


async def step_containers(ctx, svc):
    cache = ctx.setdefault("cids", {})
    if svc not in cache:
        cache[svc] = await asyncio.to_thread(containers, svc)
    return cache[svc]


async def prefetch(spec, ctx):
    """Container ids, addresses and /_faults ports of every service the fault's steps name,
    looked up before the load starts: a step then acts within milliseconds of its moment
    (docker inspect of three instances takes ~100-300 ms on this box)."""
    for st in spec["fault"]["inject"] + spec["fault"]["remove"]:
        if "docker" in st:
            cids = await step_containers(ctx, st["service"])
            await asyncio.to_thread(record_ips, ctx, st["service"], cids)
        if "faults" in st and st["faults"] not in ctx.setdefault("sim_ports", {}):
            ctx["sim_ports"][st["faults"]] = await asyncio.to_thread(sim_ports, st["faults"])


def record_ips(ctx, service, cids=None):
    """Remembers each instance's address on the stack network ("storage#2" -> IP) as it was
    before a step changed it (a killed container loses it): expectations about "the killed
    instance" name it by the address the gateway knows it by. The first address seen wins."""
    name, _ = split_service(service)
    for cid in cids or containers(name):
        try:
            num = sh("docker", "inspect", "-f", '{{index .Config.Labels "com.docker.compose.container-number"}}', cid)
            ip = instance_ip(cid)
        except Exception:
            continue
        if ip:
            ctx.setdefault("ips", {}).setdefault(f"{name}#{num}", ip)
            ctx.setdefault("ips_latest", {})[f"{name}#{num}"] = ip


async def admin_upstreams(port):
    status, _, body = await http(port, "GET", "/admin/upstreams", timeout=2.0)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"/admin/upstreams: {status}")
    return {u["upstream"]: u for u in body.get("upstreams", [])}


async def wait_instances_settled(timeout=20):
    """Every gateway lists each scaled service's current instances (exactly the running
    containers' addresses) as healthy, with a closed breaker: what an experiment about
    instances must start from (discovery and probes take their intervals after a restore)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        bad = []
        for svc in SCALE:
            want = set()
            for cid in await asyncio.to_thread(containers, svc):
                ip = await asyncio.to_thread(instance_ip, cid)
                if ip:
                    want.add(ip)
            for gw, port in ADMIN_PORTS.items():
                try:
                    up = (await admin_upstreams(port)).get(svc) or {}
                except Exception as e:
                    bad.append(f"{gw}: {e}")
                    continue
                healthy = {i["address"].rsplit(":", 1)[0] for i in up.get("instances", []) if i["state"] == "healthy"}
                if healthy != want or breaker_state(up.get("breaker")) not in ("closed", None):
                    bad.append(f"{gw} {svc}: healthy {sorted(healthy)} want {sorted(want)} breaker {up.get('breaker')}")
        if not bad:
            return
        last = bad
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances not settled after {timeout}s: {last}")
        await asyncio.sleep(0.25)


async def reset_gateways():
    """Closed breakers and an empty cache on both replicas, so experiments are independent."""
    for gw, port in ADMIN_PORTS.items():
        status, _, body = await http(port, "GET", "/admin/breakers")
        if isinstance(body, dict) and isinstance(body.get("breakers"), list):
            names = [b["upstream"] for b in body["breakers"] if "upstream" in b]
        elif isinstance(body, dict):
            names = list(body.keys())
        else:
            names = ["auth", "storage", "analytics", "socket"]
        for u in names:
            await http(port, "POST", f"/admin/breakers/{u}/reset")
        await http(port, "DELETE", "/admin/cache")


# ---------------------------------------------------------------- measurements

def scrape(port):
    import urllib.request
    # 15 s: a replica held to 0.01 CPU (experiment 20) takes seconds to render its metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as r:
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


class Poller:
    """Runs `poll()` every `every_s` while the load runs, keeping what it finds in `samples`
    (the samplers below); starts only when it has something to sample (`wanted`)."""

    def __init__(self, wanted, t0, every_s):
        self.wanted, self.t0, self.every = wanted, t0, every_s
        self.samples = []
        self.task = None
        self.stopped = False

    def now(self):
        return round(time.monotonic() - self.t0, 3)

    async def loop(self):
        while not self.stopped:
            await self.poll()
            await asyncio.sleep(self.every)

    def start(self):
        if self.wanted:
            self.task = asyncio.create_task(self.loop())

    async def stop(self):
        # A flag as well as cancel(): Python 3.11's wait_for (inside every request) can
        # swallow a cancellation that lands as its request completes, and the poll would
        # then run on forever (seen once: an experiment stuck for 14 minutes).
        self.stopped = True
        if self.task:
            self.task.cancel()
            await asyncio.wait([self.task], timeout=5)


class UpstreamSampler(Poller):
    """Polls every gateway's GET /admin/upstreams every `every_s` while the load runs and keeps,
    per poll, each sampled upstream's breaker state and its instances (address, state,
    successes, failures): when an instance was ejected, when a new one first took traffic,
    whether the breaker ever left `closed`.
    Samples: {"t", "gw", "upstream", "breaker", "instances": {ip: [state, ok, fail]}}."""

    def __init__(self, upstreams, t0, every_s=0.1):
        super().__init__(upstreams, t0, every_s)

    async def poll(self):
        for gw, port in ADMIN_PORTS.items():
            try:
                ups = await admin_upstreams(port)
            except Exception:
                continue
            t = self.now()
            for name in self.wanted:
                u = ups.get(name)
                if u is None:
                    continue
                self.samples.append({
                    "t": t, "gw": gw, "upstream": name, "breaker": breaker_state(u.get("breaker")),
                    "instances": {i["address"].rsplit(":", 1)[0]: [i["state"], i.get("successes", 0), i.get("failures", 0)]
                                  for i in u.get("instances", [])}})


class MetricSampler(Poller):
    """Polls every gateway's /metrics every `every_s` while the load runs and keeps, per poll,
    the sum of each sampled series (`{"id", "name", "labels"}`): when a gauge changed on each
    replica (06: back on Redis), which the end scrape cannot tell.
    Samples: {"t", "gw", "values": {id: sum}}."""

    def __init__(self, series, t0, every_s=0.1):
        super().__init__(series, t0, every_s)

    async def poll(self):
        for gw, port in ADMIN_PORTS.items():
            try:
                status, _, text = await http(port, "GET", "/metrics", timeout=2.0)
            except Exception:
                continue
            if status != 200 or not isinstance(text, str):
                continue
            self.samples.append({"t": self.now(), "gw": gw,
                                 "values": {s["id"]: metric_sum(text, s["name"], s.get("labels"))
                                            for s in self.wanted}})


class HealthSampler(Poller):
    """Polls Docker's health status (the compose health check: `probe /health` every 2 s) of
    some services every `every_s` while the load runs: a saturated replica that its
    orchestrator would mark unhealthy, and restart, shows up here.
    Samples: {"t", "service", "status", "health"}."""

    def __init__(self, services, t0, every_s=0.5):
        super().__init__(services, t0, every_s)

    async def poll(self):
        for svc in self.wanted:
            try:
                for status, h in await asyncio.to_thread(health, svc):
                    self.samples.append({"t": self.now(), "service": svc, "status": status, "health": h})
            except Exception as e:
                self.samples.append({"t": self.now(), "service": svc,
                                     "status": f"error:{type(e).__name__}", "health": None})


def breaker_state(b):
    """The breaker's state from /admin/upstreams, as a word (closed, open, half_open)."""
    if isinstance(b, dict):
        b = b.get("state")
    return str(b).lower() if b is not None else None


# ---------------------------------------------------------------- expectations

def window_bounds(name, ev, end):
    """Phase boundaries in seconds from load start. The fault window runs from the start of
    the inject steps (a `docker kill` bites while the command is still returning) to the
    start of the remove steps: the time the fault is held as injected. While the remove
    steps run (`removing`: a `docker start` boots the container, a scale-up starts several)
    the fault is being lifted, neither held nor gone, so neither window judges it; recovery
    runs from the end of the remove steps to the end of the load. The charts draw these
    same windows (report.py). `injecting` is the inject steps' own run (a `docker restart`
    takes 0.5-1.9 s here, depending on Docker more than on the service) and `after_inject`
    everything after it: criteria about what the gateway controls, rather than how long Docker
    took, select those."""
    return {
        "steady": (0.0, ev["inject_start"]),
        "injecting": (ev["inject_start"], ev["inject_end"]),
        "after_inject": (ev["inject_end"], end),
        "fault": (ev["inject_start"], ev["remove_start"]),
        "removing": (ev["remove_start"], ev["remove_end"]),
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


def access_lines(service, marker='"target":"access"'):
    """The gateway's JSON log lines containing `marker` so far (`docker logs`; the gateway
    logs to stdout): by default its access lines."""
    out = sh("docker", "logs", container(service), timeout=30)
    lines = []
    for line in out.splitlines():
        if marker not in line:
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
    elif re.fullmatch(r"p\d+(\.\d+)?_ratio", kind):
        # A latency percentile of the selected requests over the same percentile of the
        # `baseline` selection (e.g. fault-phase p50 / steady-phase p50).
        q = float(kind[1:-6])
        lats = [r["lat_ms"] for r in chosen if matches(r, exp.get("match", {})) and r["lat_ms"] is not None]
        base = [r["lat_ms"] for r in select(records, exp["baseline"], ev, end)
                if matches(r, exp.get("match", {})) and r["lat_ms"] is not None]
        n = min(len(lats), len(base))
        if lats and base:
            value = percentile(lats, q) / percentile(base, q)
            detail = {"value_ms": percentile(lats, q), "baseline_ms": percentile(base, q),
                      "n_value": len(lats), "n_baseline": len(base)}
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
    elif kind == "goodput_rps":
        # Matching answers (e.g. status 200) COMPLETED per second within a window (`window`,
        # default fault, from + `skip_s`): what a saturated upstream still delivers, whatever
        # the offered rate. The other `select` filters (req, target) apply; the window is by
        # completion, not by send time, so answers that waited past the window do not count.
        a, b = window_bounds(exp.get("window", "fault"), ev, end)
        a += exp.get("skip_s", 0)
        pool = [r for r in records if matches(r, {k: v for k, v in sel.items() if k not in ("window", "skip_s", "until_s")})]
        done = [r for r in pool if r["lat_ms"] is not None and matches(r, exp.get("match", {}))
                and a <= r["t"] + r["lat_ms"] / 1000 < b]
        n = len(done)
        value = round(n / (b - a), 2) if b > a else None
        detail = {"completed": n, "window_s": round(b - a, 3)}
    elif kind == "unhealthy_samples":
        # Docker health samples (HealthSampler) of `service` not "healthy" from event `from`.
        t_ev = ev.get(exp.get("from"), 0.0) if exp.get("from") else 0.0
        mine = [x for x in ctx.get("health_samples", []) if x["service"] == exp["service"] and x["t"] >= t_ev]
        bad = [x for x in mine if x["health"] != "healthy"]
        value, n = len(bad), len(mine)
        detail = {"first_bad": bad[0] if bad else None}
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
        # `gateways` (optional) limits it to some replicas (one starved replica's own figure).
        a, b = ctx["scrapes"][exp.get("from_scrape", "inject_end")], ctx["scrapes"][exp.get("to_scrape", "remove_start")]
        lab = dict(exp.get("labels", {}))
        gws = as_list(exp.get("gateways", list(b)))
        d = lambda name, extra: sum(metric_sum(b[g], name, {**lab, **extra}) - metric_sum(a[g], name, {**lab, **extra})
                                    for g in gws if g in a and g in b)
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
    elif kind == "attempt_log_count":
        # Attempts the gateways' attempt log ("upstream attempt" lines; failed attempts are
        # logged at info) sent to one instance, named by the address it had before the fault
        # (`instance`: "storage#2"), from an event + skip_s to a mark. n: that instance's
        # lines over the whole run (evidence the log names it at all).
        ip = ctx.get("ips", {}).get(exp["instance"])
        lo = ctx["wall0"] + ev[exp.get("from", "inject_end")] + exp.get("skip_s", 0)
        hi = ctx["marks"][exp.get("to_mark", "remove_start")]
        want = exp.get("log_match", {})
        total, late, last = 0, 0, None
        for g in as_list(exp.get("gateways", list(ADMIN_PORTS))):
            for line in access_lines(g, '"message":"upstream attempt"'):
                if not ip or str(line.get("instance", "")).rsplit(":", 1)[0] != ip:
                    continue
                if not all(line.get(k) in as_list(v) for k, v in want.items()):
                    continue
                total += 1
                ts = dt.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
                last = ts if last is None else max(last, ts)
                if lo <= ts <= hi:
                    late += 1
        value, n = late, total
        detail = {"instance": exp["instance"], "address": ip, "lines_whole_run": total,
                  "last_attempt_s_after_event": round(last - (lo - exp.get("skip_s", 0)), 3) if last else None}
    elif kind in ("instance_state_s", "new_instance_traffic_s", "breaker_not_closed_samples", "instance_failures_after"):
        value, n, detail = evaluate_upstream_samples(exp, ev, ctx)
    elif kind == "metric_reached_s":
        # Seconds from event `from` (default remove_end) to the first /metrics sample
        # (MetricSampler) in which series `sample` is >= `reach`, per gateway; the slowest
        # (None when one never got there). n: the gateways that got there.
        t_ev = ev[exp.get("from", "remove_end")] + exp.get("skip_s", 0)
        per, value, n = {}, 0.0, 0
        for gw in as_list(exp.get("gateways", list(ADMIN_PORTS))):
            hit = next((s["t"] for s in ctx.get("metric_samples", [])
                        if s["gw"] == gw and s["t"] >= t_ev and s["values"].get(exp["sample"], 0) >= exp["reach"]), None)
            per[gw] = round(hit - t_ev, 3) if hit is not None else None
            if hit is None:
                value = None
            else:
                n += 1
                value = None if value is None else max(value, hit - t_ev)
        detail = {"per_gateway": per, "samples": len(ctx.get("metric_samples", []))}
    elif kind.startswith("ws_"):
        value, n, detail = evaluate_ws(exp, ev, end, ctx)
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


def evaluate_upstream_samples(exp, ev, ctx):
    """Metrics on the /admin/upstreams samples (UpstreamSampler). Returns (value, n, detail).

    instance_state_s: seconds from event `from` (with `since_first_failure`: from the first
      sample after it in which that gateway had counted a failure of the instance) to the
      first sample in which instance `instance` ("storage#2", by its address before the fault)
      is in state `state` (or, with `or_gone`, no longer listed), on every gateway: the slower
      gateway's figure.
    new_instance_traffic_s: seconds from each of `instances` (as addressed after the fault's
      steps: new containers) starting (`from`: "container_start", the container's StartedAt
      after the last scale step; or an event) to the first sample in which it is healthy with
      more successes than at that moment (0 if it was not listed then), on every gateway:
      the slowest pair.
    breaker_not_closed_samples: samples (every gateway) in which the upstream's breaker is not
      closed, between `from` (default 0) and the end.
    instance_failures_after: growth of instance `instance`'s failure count on every gateway
      from event `from` + skip_s to the end (attempts that still went to it).
    """
    kind = exp["metric"]
    up = exp.get("upstream", "storage")
    samples = [s for s in ctx.get("upstream_samples", []) if s["upstream"] == up]
    gws = as_list(exp.get("gateways", list(ADMIN_PORTS)))
    t_ev = ev[exp["from"]] if exp.get("from") in ev else 0.0
    t_ev += exp.get("skip_s", 0)
    if kind == "breaker_not_closed_samples":
        chosen = [s for s in samples if s["t"] >= t_ev and s["gw"] in gws]
        bad = [s for s in chosen if s["breaker"] != "closed"]
        return len(bad), len(chosen), {"first_bad": bad[0]["t"] if bad else None,
                                       "states": sorted({s["breaker"] for s in bad})}
    if kind in ("instance_state_s", "instance_failures_after"):
        ip = ctx.get("ips", {}).get(exp["instance"])
        worst, n, per = None, 0, {}
        for gw in gws:
            mine = [s for s in samples if s["gw"] == gw]
            if kind == "instance_state_s":
                if exp.get("since_first_failure"):
                    # From the first sample (after the event) in which this gateway had seen the
                    # instance fail: how fast the gateway reacts once it has evidence.
                    base = next((s["instances"][ip][2] for s in reversed(mine) if s["t"] <= t_ev and ip in s["instances"]), 0)
                    first = next((s["t"] for s in mine if s["t"] > t_ev and ip in s["instances"]
                                  and s["instances"][ip][2] > base), None)
                    if first is None:
                        per[gw] = None
                        return None, n, {"address": ip, "per_gateway": per, "note": f"{gw} saw no failure"}
                    t_ev_gw = first
                else:
                    t_ev_gw = t_ev
                hit = next((s["t"] for s in mine if s["t"] >= t_ev_gw and (
                    (ip in s["instances"] and s["instances"][ip][0] == exp["state"])
                    or (exp.get("or_gone") and ip not in s["instances"]))), None)
                n += 1 if hit is not None else 0
                per[gw] = round(hit - t_ev_gw, 3) if hit is not None else None
                if t_ev_gw != t_ev:
                    per[gw + " first_failure_s"] = round(t_ev_gw - t_ev, 3)
                if hit is None:
                    return None, n, {"address": ip, "per_gateway": per}
                worst = max(worst or 0, hit - t_ev_gw)
            else:
                before = [s for s in mine if s["t"] <= t_ev and ip in s["instances"]]
                after = [s for s in mine if s["t"] > t_ev and ip in s["instances"]]
                base = before[-1]["instances"][ip][2] if before else 0
                grow = max((s["instances"][ip][2] for s in after), default=base) - base
                per[gw] = grow
                n += len([s for s in mine if s["t"] > t_ev])
                worst = max(worst or 0, grow)
        return (round(worst, 3) if isinstance(worst, float) else worst), n, {"address": ip, "per_gateway": per}
    if kind == "new_instance_traffic_s":
        worst, n, per = 0.0, 0, {}
        for inst in as_list(exp["instances"]):
            ip = ctx.get("ips_latest", {}).get(inst)
            t_start = ctx.get("started_at", {}).get(inst) if exp.get("from") == "container_start" else t_ev
            if ip is None or t_start is None:
                return None, n, {"per_instance": per, "missing": inst}
            for gw in gws:
                mine = [s for s in samples if s["gw"] == gw]
                before = [s for s in mine if s["t"] <= t_start]
                base = before[-1]["instances"].get(ip, [None, 0])[1] if before else 0
                hit = next((s["t"] for s in mine if s["t"] > t_start and ip in s["instances"]
                            and s["instances"][ip][0] == "healthy" and s["instances"][ip][1] > base), None)
                per[f"{gw} {inst} {ip}"] = round(hit - t_start, 3) if hit is not None else None
                if hit is None:
                    return None, n, {"per_instance": per}
                n += 1
                worst = max(worst, hit - t_start)
        return round(worst, 3), n, {"per_instance": per}
    raise ValueError(kind)


def evaluate_ws(exp, ev, end, ctx):
    """Metrics on the WebSocket subscribers' records (chaos/wsclient.py). Returns (value, n,
    detail). `group`: which subscribers; `from` / `to`: events (or "end"), `skip_s`.

    ws_end_s: seconds from `from` to the first end (close frame or end of stream) of every
      subscriber connected at that moment; the slowest (None if one never ended).
    ws_end_min_s: the same, the quickest (a lower bound: nothing closed them early).
    ws_end_code_share: share of those first ends that are close frames with a code in `codes`.
    ws_end_count: ends in [from + skip_s, to).
    ws_tick_gap_s: the longest wait for a tick, per subscriber, within [from + skip_s, to).
    ws_reject_share: of the upgrade attempts refused or failed in [from + skip_s, to), the
      share answered with a status in `status` and a JSON body (before any upgrade).
    ws_reject_pNN_ms / ws_reject_max_ms: their latency (failed connections count as
      infinitely slow).
    ws_resubscribed_s: seconds from `from` to the first tick after a new connection, per
      subscriber; the slowest (None if one never got one).
    """
    kind = exp["metric"]
    subs = [s for s in ctx.get("subs", []) if s["group"] in as_list(exp["group"])]
    evs = dict(ev, end=end, start=0.0)
    t_from = evs[exp.get("from", "inject_end")]
    lo = t_from + exp.get("skip_s", 0)
    hi = evs[exp.get("to", "end")]
    if kind in ("ws_end_s", "ws_end_min_s", "ws_end_code_share"):
        firsts, missing = [], 0
        for s in subs:
            state = None
            for e in s["events"]:
                if e["t"] >= t_from:
                    break
                if e["kind"] == "connected":
                    state = "open"
                elif e["kind"] == "end":
                    state = None
            if state != "open":
                continue
            fe = next((e for e in s["events"] if e["t"] >= t_from and e["kind"] == "end"), None)
            if fe is None:
                missing += 1
            else:
                firsts.append(fe)
        n = len(firsts) + missing
        codes = {}
        for e in firsts:
            k = str(e["code"]) if e["code"] is not None else e["how"]
            codes[k] = codes.get(k, 0) + 1
        detail = {"connected_at_event": n, "never_ended": missing, "ends_by_code": codes}
        if kind in ("ws_end_s", "ws_end_min_s"):
            if missing or not firsts:
                return None, n, detail
            pick = max if kind == "ws_end_s" else min
            return round(pick(e["t"] for e in firsts) - t_from, 3), n, detail | {
                "min_s": round(min(e["t"] for e in firsts) - t_from, 3)}
        ok = sum(1 for e in firsts if e["code"] in as_list(exp["codes"]))
        return (round(ok / n, 4) if n else None), n, detail
    if kind == "ws_end_count":
        ends = [e for s in subs for e in s["events"] if e["kind"] == "end" and lo <= e["t"] < hi]
        ticks = sum(1 for s in subs for e in s["events"] if e["kind"] == "tick" and lo <= e["t"] < hi)
        return len(ends), ticks, {"ticks_in_window": ticks, "ends": ends[:5]}
    if kind == "ws_tick_gap_s":
        worst, n = 0.0, 0
        for s in subs:
            ts = [lo] + [e["t"] for e in s["events"] if e["kind"] == "tick" and lo <= e["t"] < hi] + [hi]
            n += len(ts) - 2
            worst = max(worst, max(b - a for a, b in zip(ts, ts[1:])))
        return round(worst, 3), n, {"subscribers": len(subs), "ticks": n}
    if kind.startswith("ws_reject_"):
        att = [e for s in subs for e in s["events"]
               if e["kind"] in ("rejected", "connect_error") and lo <= e["t"] < hi]
        n = len(att)
        by = {}
        for e in att:
            k = f"{e.get('status', e.get('err'))} {e.get('reason') or ''}".strip()
            by[k] = by.get(k, 0) + 1
        accepted = sum(1 for s in subs for e in s["events"] if e["kind"] == "connected" and lo <= e["t"] < hi)
        detail = {"attempts": by, "upgraded_in_window": accepted}
        if kind == "ws_reject_share":
            ok = sum(1 for e in att if e["kind"] == "rejected" and e["status"] in as_list(exp["status"]) and e["json"])
            return (round(ok / n, 4) if n else None), n, detail
        lats = [e["lat_ms"] if e["kind"] == "rejected" else float("inf") for e in att]
        if not lats:
            return None, 0, detail
        v = max(lats) if kind == "ws_reject_max_ms" else percentile(lats, float(kind[len("ws_reject_p"):-3]))
        return (round(v, 3) if v != float("inf") else None), n, detail | {"p50_ms": percentile(lats, 50)}
    if kind == "ws_resubscribed_s":
        worst, n, missing = 0.0, 0, 0
        for s in subs:
            conn = next((e for e in s["events"] if e["kind"] == "connected" and e["t"] >= t_from), None)
            tick = next((e for e in s["events"] if conn and e["kind"] == "tick" and e["t"] >= conn["t"]), None)
            if tick is None:
                missing += 1
                continue
            n += 1
            worst = max(worst, tick["t"] - t_from)
        detail = {"subscribers": len(subs), "never_resubscribed": missing}
        return (None if missing or not n else round(worst, 3)), n, detail
    raise ValueError(f"unknown metric {kind}")


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
              "criteria_note": spec.get("note"), "pending": spec.get("pending"), "events": {}, "steps": [], "expectations": [],
              "restore_errors": [], "pass": False}
    started = time.monotonic()
    injected = False
    try:
        errs = await restore_all()
        if errs:
            raise RuntimeError(f"stack not restorable before the experiment: {errs}")
        if spec.get("fresh_gateways"):
            # Restarting a container also restarts Docker's userland proxy of its published
            # port, which keeps the splice pipes of a past flood (thousands of fds, up to its
            # 20000-fd limit, past which it stops accepting for good): a flood starts from a
            # fresh proxy, and from gateways with no state learned from a previous experiment.
            gws = list(ADMIN_PORTS)
            await asyncio.gather(*(asyncio.to_thread(sh, "docker", "restart", "-t", "3", container(g)) for g in gws))
            await wait_healthy(gws, 60)
            result["steps"].append({"t": "before", "step": f"docker restart {' '.join(gws)}"})
        await reset_gateways()
        # Instances the gateways list as healthy: every experiment waits (up to 20 s) for it
        # after the restore; for those about instances (11-14, "settle_instances": "required")
        # a stack that does not get there is a failure, for the others a recorded warning.
        try:
            await wait_instances_settled(20 if spec.get("settle_instances") == "required" else 5)
        except RuntimeError as e:
            if spec.get("settle_instances") == "required":
                raise
            result["warning"] = str(e)
            log(f"  warning: {e}")
        for svc in SCALE:
            await asyncio.to_thread(record_ips, ctx, svc, None)
        await prefetch(spec, ctx)
        result["instances_at_start"] = dict(ctx.get("ips", {}))
        # The conditions the whole run happens in (e.g. a worker limit on storage): set before
        # the steady-state check, lifted by the restore that follows every experiment.
        for st in spec.get("environment", []):
            result["steps"].append({"t": "environment", "step": await run_step(st, ctx)})
        await setup_steps(spec.get("setup"), ctx)
        plan = json.loads(fill(json.dumps(spec["load"]), ctx))
        ph = spec["phases"]
        plan["duration_s"] = ph["steady_s"] + ph["fault_s"] + ph["recovery_s"]
        if "spike_rate" in plan:
            # A demand spike is the fault: the main stream runs at spike_rate for the fault
            # window and at rate before and after (streams with their own rate are unchanged).
            a, b = ph["steady_s"], ph["steady_s"] + ph["fault_s"]
            plan["segments"] = [{"from_s": 0, "to_s": a, "rate": plan["rate"]},
                                {"from_s": a, "to_s": b, "rate": plan["spike_rate"]},
                                {"from_s": b, "to_s": plan["duration_s"], "rate": plan["rate"]}]
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
        up_sampler = UpstreamSampler(spec.get("sample_upstreams", []), t0)
        health_sampler = HealthSampler(spec.get("sample_health", []), t0)
        metric_sampler = MetricSampler(spec.get("sample_metrics", []), t0)

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
        up_sampler.start()
        health_sampler.start()
        metric_sampler.start()
        fault_task = asyncio.create_task(fault_script())
        subs_task = None
        if spec.get("subscribers"):
            subs_task = asyncio.create_task(
                wsclient.run_subscribers(spec["subscribers"], PORTS, t0, plan["duration_s"]))
        records = await loadgen.run_load(plan, PORTS, t0)
        await fault_task
        if subs_task:
            ctx["subs"] = await subs_task
        await up_sampler.stop()
        ctx["upstream_samples"] = up_sampler.samples
        await health_sampler.stop()
        ctx["health_samples"] = health_sampler.samples
        await metric_sampler.stop()
        ctx["metric_samples"] = metric_sampler.samples
        if sampler.services:
            # Keep sampling after the load has stopped and its connections are closed: the
            # "end" resource figures are taken from there.
            await asyncio.sleep(2.5)
        await sampler.stop()
        end = plan["duration_s"]
        await asyncio.to_thread(scrape_all, ctx, "end")
        ctx["samples"] = sampler.samples
        result["load"] = {"rate": plan["rate"], "duration_s": end, "requests": len(records)}
        if "spike_rate" in plan:
            result["load"]["spike_rate"] = plan["spike_rate"]
        if health_sampler.samples:
            result["container_health"] = health_sampler.samples
        for exp in spec["expectations"]:
            result["expectations"].append(evaluate(exp, records, ev, end, ctx))
        result["figures"] = summarize(records, ev, end)
        result["resources"] = sampler.samples
        if ctx.get("subs"):
            result["subscribers"] = summarize_subs(ctx["subs"], ev, end)
            (outdir / f"{name}.ws.jsonl").write_text("\n".join(json.dumps(s) for s in ctx["subs"]) + "\n")
        if up_sampler.samples:
            (outdir / f"{name}.upstreams.jsonl").write_text("\n".join(json.dumps(s) for s in up_sampler.samples) + "\n")
        result["instances"] = {"first_seen": ctx.get("ips", {}), "latest": ctx.get("ips_latest", {})}
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
        log(f"=== {name}: {'PASS' if result['pass'] else 'FAIL'}"
            f"{' (pending: does not decide the exit status)' if result['pending'] else ''} in {result['duration_s']}s")
    return result


def _alive(service):
    try:
        return health(service)[0][0] == "running" and not inspect(service)["State"].get("Paused")
    except Exception:
        return False


def summarize_subs(subs, ev, end):
    """Per group and phase: subscribers, events by kind, ends by close code."""
    out = {}
    for w in ("steady", "fault", "recovery", "all"):
        a, b = window_bounds(w, ev, end)
        for s in subs:
            g = out.setdefault(s["group"], {}).setdefault(w, {"subscribers": 0, "events": {}, "ends": {}})
            g["subscribers"] += 1
            for e in s["events"]:
                if a <= e["t"] < b:
                    g["events"][e["kind"]] = g["events"][e["kind"]] + 1 if e["kind"] in g["events"] else 1
                    if e["kind"] == "end":
                        k = str(e["code"]) if e["code"] is not None else e["how"]
                        g["ends"][k] = g["ends"].get(k, 0) + 1
    return out


def summarize(records, ev, end):
    """Per-phase figures: counts by status / reason / cache, latency percentiles."""
    out = {}
    for w in ("steady", "fault", "removing", "recovery", "all"):
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
        # A name, a number, or the file's path (chaos/experiments/NN-....json).
        hit = [s for s in specs if n in (s["name"], s["_file"], Path(s["_file"]).stem)
               or Path(n).name == s["_file"]
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
                "experiments": len(results), "passed": sum(1 for r in results if r["pass"]),
                "pending": [r["name"] for r in results if r.get("pending")]}
        (outdir / "report.json").write_text(json.dumps({"run": meta, "results": results}, indent=2))
        (outdir / "summary.md").write_text(report.summary_md(meta, results))
        log(f"{meta['passed']}/{len(specs)} experiments passed in {total}s; report in {outdir}")
    # A pending experiment (its file says why: the behaviour it judges is not built yet) runs
    # and is reported like any other, but only the others decide the exit status.
    decided = [r for r in results if not r.get("pending")]
    return 0 if results and all(r["pass"] for r in decided) and len(results) == len(specs) else 1


def main():
    # Overload experiments hold thousands of requests in flight, one connection each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
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
