#!/usr/bin/env python3
"""Checks deploy/kubernetes (called by scripts/check-manifests; see that file).

1. Renders the kustomization (`kubectl kustomize`, else `kustomize build`; with neither, reads
   kustomization.yaml itself: its resources and generator files must exist).
2. Validates every rendered object against the Kubernetes schemas, offline and strictly
   (unknown fields are errors), for the oldest and the newest supported Kubernetes.
3. Holds the manifests against the gateway itself: ports and probe paths against the mounted
   gateway TOML and src/routes, env var names against what src/ reads, upstream URLs against
   headless Services and the backends' ports, the termination budget against shutdown_grace,
   and the TOML through the gateway's own `check-config` with the Deployment's environment.

Exit 0 when all is well, 1 with one line per problem otherwise.
"""
import argparse
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Kubernetes versions validated against: the oldest this example supports (the preStop
# `sleep` action is on by default from 1.30) and the newest the installed schemas know.
MIN_KUBE = "1.30.0"

# Names the manifests use ahead of the code, with the reason. While absent from src/ they are
# reported as notes, not errors; once the code has them the entry is dead and says so.
PENDING: dict[str, str] = {}

# Variables the gateway reads without naming them in a string literal.
READ_INDIRECTLY = {
    # tracing_subscriber::EnvFilter::try_from_default_env()
    "RUST_LOG": ("src/observability", "from_default_env"),
}

errors: list[str] = []
notes: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


def note(msg: str) -> None:
    notes.append(msg)


# ------------------------------------------------------------------ rendering

def render(kdir: Path) -> tuple[list[dict], str]:
    """The kustomization's objects and how they were obtained."""
    for cmd in (["kubectl", "kustomize", str(kdir)], ["kustomize", "build", str(kdir)]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if p.returncode != 0:
            fail(f"{' '.join(cmd[:2])} failed:\n{p.stderr.strip()}")
            return [], cmd[0]
        return [d for d in yaml.safe_load_all(p.stdout) if d], " ".join(cmd[:2])
    return render_by_hand(kdir), "kustomization.yaml read by hand (no kubectl/kustomize)"


def render_by_hand(kdir: Path) -> list[dict]:
    """Without kustomize: the listed files, generated ConfigMaps/Secrets (unhashed names,
    which is also what the Deployment refers to before kustomize rewrites it)."""
    kfile = kdir / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = kdir / res
        if not path.is_file():
            fail(f"kustomization.yaml: resource {res} does not exist")
            continue
        objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(key, []):
            data = {}
            for f in gen.get("files", []):
                name, src = f.split("=", 1) if "=" in f else (Path(f).name, f)
                path = kdir / src
                if not path.is_file():
                    fail(f"kustomization.yaml: {key} {gen['name']}: file {path.name} does not exist")
                    continue
                data[name] = path.read_text()
            for lit in gen.get("literals", []):
                name, _, value = lit.partition("=")
                data[name] = value
            obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
            obj["stringData" if kind == "Secret" else "data"] = data
            objs.append(obj)
    if ns := k.get("namespace"):
        for o in objs:
            if o["kind"] != "Namespace":
                o["metadata"].setdefault("namespace", ns)
    return objs


def unlisted_files(kdir: Path) -> None:
    """A manifest in the folder that the kustomization does not apply is a mistake."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    listed = set(k.get("resources", []))
    # Files a generator turns into a ConfigMap (the alert rules) are listed there instead.
    for gen in k.get("configMapGenerator", []):
        listed.update(f.split("=", 1)[-1] for f in gen.get("files", []))
    for path in sorted(kdir.glob("*.y*ml")):
        if path.name != "kustomization.yaml" and path.name not in listed:
            fail(f"{path.name} is not listed in kustomization.yaml resources")


# ------------------------------------------------------------------ schemas

def validate_schemas(objs: list[dict]) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = [MIN_KUBE, latest_version()]
    for version in versions:
        for o in objs:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except Exception as e:  # ValidationError, or no schema for the kind/version
                first = str(e).splitlines()[0]
                fail(f"schema {version}: {o['kind']}/{o['metadata'].get('name')}: {first}")
    return versions


# ------------------------------------------------------------------ helpers

def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def named(objs, kind, name):
    for o in of_kind(objs, kind):
        if o["metadata"]["name"] == name:
            return o
    return None


def pod_labels(dep):
    return dep["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict, port) -> int | None:
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def deployments_selected(objs, selector):
    return [d for d in of_kind(objs, "Deployment") if selects(selector, pod_labels(d))]


def duration_secs(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}")
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def source_text(*globs: str) -> str:
    return "\n".join(p.read_text() for g in globs for p in sorted(ROOT.glob(g)))


def read_by_gateway(name: str) -> bool:
    if f'"{name}"' in source_text("src/config/*.rs", "src/main.rs"):
        return True
    if name in READ_INDIRECTLY:
        folder, marker = READ_INDIRECTLY[name]
        return marker in source_text(f"{folder}/**/*.rs")
    return False


def pending(key: str, present: bool, what: str) -> bool:
    """True when a missing name is an expected one (a note, not an error)."""
    if key in PENDING:
        if present:
            note(f"{what} is in src/ now: drop {key!r} from PENDING in scripts/check_manifests.py")
        else:
            note(f"{what}: not in this gateway yet ({PENDING[key]}); not an error until then")
        return True
    return False


# ------------------------------------------------------------------ the gateway

def check_gateway(objs: list[dict], gateway_bin: str | None) -> None:
    dep = named(objs, "Deployment", "gateway")
    if dep is None:
        fail("no Deployment named gateway")
        return
    pod = dep["spec"]["template"]["spec"]
    ctr = next((c for c in pod["containers"] if c["name"] == "gateway"), pod["containers"][0])
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    where = "Deployment/gateway"

    if not selects(dep["spec"]["selector"].get("matchLabels", {}), pod_labels(dep)):
        fail(f"{where}: selector does not match its own pod labels")

    # --- the gateway config the pod mounts
    cfg_path = env.get("GATEWAY_CONFIG")
    if not cfg_path:
        fail(f"{where}: GATEWAY_CONFIG is not set: the pod would run without its TOML")
        return
    mount = next((m for m in ctr.get("volumeMounts", [])
                  if cfg_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    volume = mount and next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)
    cm_name = volume and volume.get("configMap", {}).get("name")
    cm = cm_name and named(objs, "ConfigMap", cm_name)
    key = cfg_path[len(mount["mountPath"].rstrip("/")) + 1:] if mount else None
    if not cm or key not in cm.get("data", {}):
        fail(f"{where}: GATEWAY_CONFIG={cfg_path} is not a key of a mounted ConfigMap")
        return
    toml_text = cm["data"][key]
    try:
        cfg = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        fail(f"ConfigMap {cm_name} {key}: {e}")
        return

    # Effective listeners: the environment overrides the file (as in src/config).
    server, admin = cfg.get("server", {}), cfg.get("admin", {})
    listen = {}
    for label, table, var in (("server", server, "PORT"), ("admin", admin, "ADMIN_PORT")):
        port = int(env[var]) if env.get(var) else table.get("port")
        if port is None:
            fail(f"{key}: [{label}] port is not set: state it, so the manifests can be checked against it")
        listen[label] = port
        if is_loopback(str(table.get("host", "127.0.0.1" if label == "admin" else "0.0.0.0"))):
            fail(f"{key}: [{label}] host is loopback: the kubelet's probes"
                 + (" and Prometheus" if label == "admin" else " and the Service") + " cannot reach it")

    # --- container ports and probes
    for name, label in (("http", "server"), ("admin", "admin")):
        got = container_port(ctr, name)
        if got is None:
            fail(f"{where}: no containerPort named {name}")
        elif got != listen[label]:
            fail(f"{where}: containerPort {name}={got} but the gateway listens on {listen[label]} ([{label}] port)")
    # The admin listener's routes live in src/server/admin.rs, the public ones in src/routes.
    admin_routes = source_text("src/server/admin.rs")
    public_routes = source_text("src/routes/**/*.rs")
    for probe_key, want_path, want_label in (("readinessProbe", "/ready", "admin"),
                                             ("livenessProbe", "/health", "server")):
        probe = ctr.get(probe_key, {}).get("httpGet")
        if not probe:
            fail(f"{where}: no httpGet {probe_key}")
            continue
        port = container_port(ctr, probe["port"])
        path = probe.get("path", "/")
        if path != want_path or port != listen[want_label]:
            fail(f"{where}: {probe_key} is {path} on {port}; want {want_path} on the {want_label} listener ({listen[want_label]})")
        listener = {listen["admin"]: "admin", listen["server"]: "public"}.get(port)
        served_by = {"admin": admin_routes, "public": public_routes}.get(listener, "")
        if listener and f'"{path}"' not in served_by:
            fail(f"{where}: {probe_key} path {path} is not a route of the {listener} listener (src/routes)")

    # --- termination: preStop + shutdown_grace must fit in the grace period
    grace_text = server.get("shutdown_grace")
    if grace_text is None:
        fail(f"{key}: [server] shutdown_grace is not set: state it, so terminationGracePeriodSeconds can be checked against it")
    else:
        grace = duration_secs(grace_text)
        pre = ctr.get("lifecycle", {}).get("preStop")
        if not pre:
            fail(f"{where}: no preStop hook: endpoints are removed while the gateway already refuses new connections")
        pre_secs = (pre or {}).get("sleep", {}).get("seconds", 0)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps <= pre_secs + grace:
            fail(f"{where}: terminationGracePeriodSeconds {tgps} <= preStop {pre_secs} s + shutdown_grace {grace:g} s: "
                 "the kubelet kills the drain")

    # --- env var names the gateway actually reads
    for name in env:
        known = read_by_gateway(name)
        if not known and not pending(f"env:{name}", known, f"env {name}"):
            fail(f"{where}: env {name} is not read by the gateway (not in src/config, src/main.rs)")
    # Every upstream URL variable the gateway reads is set (its default would be the
    # docker-compose name, not necessarily this cluster's Service).
    for name in sorted(set(re.findall(r'"([A-Z]+_SERVICE_URL)"', source_text("src/config/*.rs")))):
        if name not in env:
            fail(f"{where}: {name} is not set (the gateway reads it)")

    # --- upstream URLs -> headless Services -> backend pods' ports
    sim_services = re.search(r"pub enum Service\s*\{([^}]*)\}", source_text("src/sim/mod.rs"))
    sim_names = {v.lower() for v in re.findall(r"\b([A-Z]\w*)\s*,", sim_services[1])} if sim_services else set()
    for name, value in env.items():
        if not (name.endswith("_SERVICE_URL") or name == "REDIS_URL") or not value:
            continue
        u = urlsplit(value)
        host = (u.hostname or "").split(".")[0]
        port = u.port or {"http": 80, "https": 443, "redis": 6379}.get(u.scheme)
        svc = named(objs, "Service", host)
        if svc is None:
            fail(f"{where}: {name}={value}: no Service named {host}")
            continue
        headless = svc["spec"].get("clusterIP") == "None"
        if name.endswith("_SERVICE_URL") and not headless:
            fail(f"Service/{host}: {name} points here but it is not headless (clusterIP: None): "
                 "the gateway would see one virtual IP instead of every pod")
        backends = deployments_selected(objs, svc["spec"].get("selector", {}))
        if not backends:
            fail(f"Service/{host}: its selector matches no Deployment")
            continue
        svc_port = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
        if svc_port is None:
            fail(f"{where}: {name}={value}: Service/{host} has no port {port}")
            continue
        for b in backends:
            bctr = b["spec"]["template"]["spec"]["containers"][0]
            target = container_port(bctr, svc_port.get("targetPort", svc_port["port"]))
            if target is None:
                fail(f"Service/{host}: targetPort {svc_port.get('targetPort')} is not a port of Deployment/{b['metadata']['name']}")
                continue
            # A headless Service maps nothing: the client connects to the pod's port itself.
            if headless and target != port:
                fail(f"Service/{host} is headless, so {name} must use the pods' port {target}, not {port}")
            args = bctr.get("args", [])
            if args[:1] == ["sim"] and len(args) > 1:
                known = args[1] in sim_names
                if not known and not pending(f"sim:{args[1]}", known, f"Deployment/{b['metadata']['name']}: sim {args[1]}"):
                    fail(f"Deployment/{b['metadata']['name']}: `sim {args[1]}` is not a simulator of this binary ({', '.join(sorted(sim_names))})")
                if "--port" in args and int(args[args.index("--port") + 1]) != target:
                    fail(f"Deployment/{b['metadata']['name']}: sim listens on --port {args[args.index('--port') + 1]} but the containerPort is {target}")

    # --- the public Service: the public listener, never the admin one
    public_seen = False
    for svc in of_kind(objs, "Service"):
        if not selects(svc["spec"].get("selector", {}), pod_labels(dep)):
            continue
        targets = {container_port(ctr, p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]}
        name = f"Service/{svc['metadata']['name']}"
        if None in targets:
            fail(f"{name}: a targetPort is not a port of the gateway container")
        if listen["admin"] in targets:
            if svc["spec"].get("type", "ClusterIP") != "ClusterIP" or svc["spec"].get("clusterIP") != "None" \
                    or listen["server"] in targets:
                fail(f"{name}: forwards to the admin port {listen['admin']}: only a headless, admin-only Service may")
        elif listen["server"] in targets:
            public_seen = True
    if not public_seen:
        fail(f"no Service forwards to the gateway's public port {listen['server']}")

    # --- HPA and PDB
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = named(objs, ref["kind"], ref["name"])
        if target is None:
            fail(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: scales {ref['kind']}/{ref['name']}, which does not exist")
            continue
        uses_cpu = any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", []))
        for c in target["spec"]["template"]["spec"]["containers"]:
            if uses_cpu and "cpu" not in c.get("resources", {}).get("requests", {}):
                fail(f"{ref['kind']}/{ref['name']}: container {c['name']} has no CPU request: the HPA's utilisation has no base")
        if hpa["spec"].get("minReplicas", 1) < 2:
            fail(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: minReplicas < 2 leaves no replica during a drain")
    pdbs = [p for p in of_kind(objs, "PodDisruptionBudget")
            if selects(p["spec"]["selector"].get("matchLabels", {}), pod_labels(dep))]
    if not pdbs:
        fail("no PodDisruptionBudget selects the gateway pods")

    # --- every Service selects something
    for svc in of_kind(objs, "Service"):
        if not deployments_selected(objs, svc["spec"].get("selector", {})):
            fail(f"Service/{svc['metadata']['name']}: its selector matches no Deployment's pods")

    # --- the gateway's own verdict on the TOML, with the pod's environment
    run_check_config(toml_text, {k: v for k, v in env.items() if k != "GATEWAY_CONFIG" and v is not None},
                     gateway_bin, listen)


def run_check_config(toml_text: str, env: dict, gateway_bin: str | None, listen: dict) -> None:
    tmp = tempfile.mkdtemp(prefix="check-manifests-")
    path = os.path.join(tmp, "gateway.toml")
    with open(path, "w") as f:
        f.write(toml_text)
    if gateway_bin:
        cmd = [gateway_bin, "check-config", path]
    else:
        cmd = ["cargo", "run", "-q", "--locked", "--bin", "deltastream-gateway", "--", "check-config", path]
    child_env = {k: v for k, v in os.environ.items()
                 if not (k.endswith("_SERVICE_URL") or k in ("PORT", "ADMIN_PORT", "REDIS_URL", "SERVICE_NAME", "JWT_SECRET", "GATEWAY_CONFIG"))}
    child_env.update(env)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env, timeout=1800)
    except FileNotFoundError:
        note(f"check-config not run: {cmd[0]} not found (set GATEWAY_BIN)")
        return
    finally:
        os.unlink(path)
        os.rmdir(tmp)
    if p.returncode != 0:
        fail("gateway check-config on the ConfigMap's TOML (with the Deployment's env):\n  "
             + (p.stderr or p.stdout).strip().replace("\n", "\n  "))
        return
    m = re.search(r"public \S+:(\d+), admin \S+:(\d+)", p.stdout)
    if not m:
        note("check-config passed; its summary has no 'public H:P, admin H:P' line to compare ports with")
    elif (int(m[1]), int(m[2])) != (listen["server"], listen["admin"]):
        fail(f"check-config says public {m[1]}, admin {m[2]}; the manifests assume {listen['server']}, {listen['admin']}")
    else:
        note(f"check-config: OK (public :{m[1]}, admin :{m[2]})")


def newest_source_mtime() -> float:
    return max((p.stat().st_mtime for p in (ROOT / "src").rglob("*.rs")), default=0.0)


def choose_gateway_bin(given: str | None) -> str | None:
    """The binary check-config runs, said out loud: the one given (--gateway-bin,
    GATEWAY_BIN); else a build already in cargo's target dir, the release one when present
    (the newer of release and debug when both are); else None, and `cargo run` builds a
    debug binary (minutes and GBs the first time, so that is said too)."""
    if given:
        print(f"check-config binary: {given} (given)")
        return given
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    built = [(p.stat().st_mtime, profile, p)
             for profile in ("release", "debug")
             for p in [target / profile / "deltastream-gateway"]
             if p.is_file() and os.access(p, os.X_OK)]
    if not built:
        print(f"check-config binary: none built in {target}; building a debug one with "
              "`cargo run` (a few minutes and about 2 GB the first time; GATEWAY_BIN=path skips it)")
        return None
    # The release build, unless the debug one is newer (it then has code the release lacks).
    mtime, profile, path = max(built, key=lambda b: (b[0], b[1] == "release"))
    age_min = (time.time() - mtime) / 60
    print(f"check-config binary: {path} ({profile} build, {age_min:.0f} min old)")
    if newest_source_mtime() > mtime:
        note(f"{path} is older than the newest file in src/: check-config runs that older "
             "build (rebuild it, or set GATEWAY_BIN)")
    return str(path)


# ------------------------------------------------------------------ the alert rules

RULES = ROOT / "docker/prometheus/gateway-alerts.yml"


def check_alert_rules(objs: list[dict]) -> None:
    """The ConfigMap of alert rules carries exactly docker/prometheus/gateway-alerts.yml (the
    file scripts/check-alerts checks with promtool), and parses as a rule file."""
    cms = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("gateway-alert-rules")]
    if not cms:
        fail("no ConfigMap gateway-alert-rules (configMapGenerator in kustomization.yaml)")
        return
    data = cms[0].get("data", {})
    if list(data) != ["gateway-alerts.yml"]:
        fail(f"ConfigMap gateway-alert-rules: keys {sorted(data)}, expected gateway-alerts.yml")
        return
    if data["gateway-alerts.yml"] != RULES.read_text():
        fail("ConfigMap gateway-alert-rules differs from docker/prometheus/gateway-alerts.yml: "
             "cp docker/prometheus/gateway-alerts.yml deploy/kubernetes/gateway-alert-rules.yml")
        return
    groups = yaml.safe_load(data["gateway-alerts.yml"]).get("groups", [])
    alerts = sum(1 for g in groups for r in g.get("rules", []) if "alert" in r)
    note(f"alert rules: ConfigMap {cms[0]['metadata']['name']} = docker/prometheus/gateway-alerts.yml "
         f"({len(groups)} groups, {alerts} alerts; promtool checks them in scripts/check-alerts)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", default=str(ROOT / "deploy/kubernetes"))
    ap.add_argument("--gateway-bin", default=os.environ.get("GATEWAY_BIN"),
                    help="binary for check-config (default: the release build in cargo's "
                         "target dir, else the debug one, else `cargo run`)")
    args = ap.parse_args()
    kdir = Path(args.dir)
    args.gateway_bin = choose_gateway_bin(args.gateway_bin)

    unlisted_files(kdir)
    objs, how = render(kdir)
    print(f"rendered {len(objs)} objects ({how})")
    if objs:
        versions = validate_schemas(objs)
        print(f"schemas: {len(objs)} objects x Kubernetes {', '.join(versions)} (strict)")
        check_gateway(objs, args.gateway_bin)
        check_alert_rules(objs)
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"FAIL: {e}")
    print("manifests: " + ("OK" if not errors else f"{len(errors)} problem(s)"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
