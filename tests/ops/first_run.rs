//! What a newcomer meets on a first run, against the real binary: the README's
//! `demo --storage-instances 3`, reloading the demo's `--config` file (SIGHUP and
//! `POST /admin/reload`), SIGHUP never killing a process of ours, a partial override of an
//! embedded upstream under the demo, default caps that fit a lowered open-file limit, an
//! instance that never answered showing no latency, and the limiter's `local` state when no
//! Redis is configured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_deltastream-gateway");

/// One HTTP/1.1 exchange; the status and the body.
fn http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn json(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path).expect("answered");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// A child of ours whose stdout lines arrive on a channel (read by a thread, so the pipe
/// never fills).
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now) containing `needle`, waiting at most 20 s.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("no line with {needle:?}; seen: {:#?}", self.seen)
                }
            }
        }
    }

    /// Every line so far.
    fn log(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, and the exit code within 20 s.
    fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variables the binary reads: none is inherited from the test's.
const OUR_ENV: [&str; 9] = [
    "PORT",
    "ADMIN_PORT",
    "REDIS_URL",
    "GATEWAY_CONFIG",
    "AUTH_SERVICE_URL",
    "STORAGE_SERVICE_URL",
    "ANALYTICS_SERVICE_URL",
    "SOCKET_SERVICE_URL",
    "JWT_SECRET",
];

/// The binary, with none of [`OUR_ENV`] set, and an info log.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "info");
    for var in OUR_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// `serve` (no config file); the process and its public and admin addresses.
fn serve(cmd: Command) -> (Proc, String, String) {
    let mut p = Proc::spawn(cmd);
    let line = p.wait_for("gateway listening");
    let v: Value = serde_json::from_str(&line).unwrap();
    let at = |k: &str| v[k].as_str().unwrap().replace("0.0.0.0", "127.0.0.1");
    let (addr, admin) = (at("addr"), at("admin"));
    (p, addr, admin)
}

/// `/admin/upstreams`' entry for `name`.
fn upstream(upstreams: &Value, name: &str) -> Value {
    upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["upstream"] == name)
        .unwrap_or_else(|| panic!("no {name} in {upstreams}"))
        .clone()
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `demo ARGS` with its gateway on `gw` and admin on `admin`, sends 60 data requests
/// (4 at a time, each a different query so none is a cache hit), and prints each status,
/// `/admin/upstreams` and the exit code. Needs curl.
const DEMO_SCRIPT: &str = r#"
bin=$1; gw=$2; admin=$3; shift 3
"$bin" demo "$@" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$gw/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
seq 1 60 | xargs -P 4 -I{} curl -s -o /dev/null -w 'STATUS %{http_code}\n' \
  "http://127.0.0.1:$gw/api/data/underlying/NIFTY?limit={}"
echo "UPSTREAMS $(curl -s "http://127.0.0.1:$admin/admin/upstreams")"
kill -TERM $pid 2>/dev/null
wait $pid
echo "EXIT $?"
"#;

/// A free port whose next one is free too.
fn free_pair() -> u16 {
    for _ in 0..100 {
        let a = closed_port();
        if a < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", a + 1)).is_ok() {
            return a;
        }
    }
    panic!("no two adjacent free ports");
}

#[test]
fn demo_storage_instances_3_as_the_readme_writes_it() {
    // The README's command with its default ports (8000-8004, 9000): in a network namespace
    // of its own, so nothing else on the machine collides with it. Where user namespaces are
    // not allowed, the same collision is set up by hand: storage and analytics on adjacent
    // free ports (consecutive storage ports took analytics' port).
    let isolated = Command::new("unshare")
        .args(["-rn", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("demo.sh");
    std::fs::write(&script, DEMO_SCRIPT).unwrap();
    let mut cmd = if isolated {
        let mut cmd = Command::new("unshare");
        cmd.args(["-rn", "bash", "-c"])
            .arg(r#"ip link set lo up && exec bash "$0" "$@""#)
            .arg(&script)
            .args([BIN, "8000", "9000", "--storage-instances", "3"]);
        cmd
    } else {
        eprintln!("unshare -rn not allowed here: storage and analytics on adjacent ports");
        let (gw, admin, storage) = (closed_port(), closed_port(), free_pair());
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(BIN);
        cmd.args([gw.to_string(), admin.to_string()]);
        cmd.args([
            "--storage-instances",
            "3",
            "--auth-port",
            "0",
            "--socket-port",
            "0",
        ]);
        cmd.args([
            "--port",
            &gw.to_string(),
            "--admin-port",
            &admin.to_string(),
        ]);
        cmd.args(["--storage-port", &storage.to_string()]);
        cmd.args(["--analytics-port", &(storage + 1).to_string()]);
        cmd
    };
    for var in OUR_ENV {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let statuses: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("STATUS "))
        .collect();
    assert_eq!(statuses.len(), 60, "{stdout}");
    assert!(statuses.iter().all(|s| *s == "200"), "{stdout}");
    let upstreams: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("UPSTREAMS "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no /admin/upstreams: {stdout}"));
    let storage = &upstream(&upstreams, "storage");
    let instances = storage["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{storage}");
    for i in instances {
        assert!(
            i["successes"].as_u64().unwrap() > 0,
            "an instance never served: {storage}"
        );
        assert!(i["ewma_latency_ms"].as_f64().is_some(), "{i}");
    }
    assert!(stdout.contains("EXIT 0"), "{stdout}");
}

/// A `demo --config` file: a partial override of the embedded storage upstream and one
/// extra route to the storage simulator's `/products`.
fn demo_config(route: &str) -> String {
    format!(
        r#"
[upstreams.storage]
max_connections = 16
[[routes]]
path = "{route}"
upstream = "storage"
upstream_path = "/products"
"#
    )
}

fn demo_with(file: &std::path::Path) -> (Proc, String, String) {
    let mut cmd = bin();
    cmd.arg("--config").arg(file).arg("demo");
    for flag in [
        "--port",
        "--admin-port",
        "--auth-port",
        "--storage-port",
        "--analytics-port",
        "--socket-port",
    ] {
        cmd.args([flag, "0"]);
    }
    let mut p = Proc::spawn(cmd);
    let gw = p.wait_for("gateway     http://localhost:");
    let port = gw
        .split("localhost:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let admin = gw
        .split("(admin: http://")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    (p, format!("127.0.0.1:{port}"), admin)
}

/// Waits (bounded) until `path` answers `want`.
fn answers_within(addr: &str, path: &str, want: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if http(addr, "GET", path).is_some_and(|(s, _)| s == want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_demo_reloads_its_config_file_on_sighup_and_post_and_keeps_a_partial_override() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.toml");
    std::fs::write(&file, demo_config("/api/first")).unwrap();
    let (mut demo, addr, admin) = demo_with(&file);
    // The partial override merged with the URL the demo supplies: the route reaches the
    // storage simulator, and the tuned field is in effect.
    assert!(answers_within(&addr, "/api/first", 200));
    let config = json(&admin, "/admin/config");
    let storage = &config["config"]["upstreams"]["storage"];
    assert_eq!(storage["max_connections"], 16, "{storage}");
    assert!(
        storage["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{storage}"
    );

    // SIGHUP reloads the edited file (and does not kill the demo).
    std::fs::write(&file, demo_config("/api/second")).unwrap();
    demo.signal("HUP");
    assert!(
        answers_within(&addr, "/api/second", 200),
        "SIGHUP did not reload"
    );
    assert_eq!(http(&addr, "GET", "/api/first").unwrap().0, 404);
    assert!(demo.alive());

    // POST /admin/reload too, still pointed at the demo's simulators.
    std::fs::write(&file, demo_config("/api/third")).unwrap();
    let (status, body) = http(&admin, "POST", "/admin/reload").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(answers_within(&addr, "/api/third", 200));
    assert_eq!(
        json(&admin, "/admin/config")["config"]["upstreams"]["storage"]["max_connections"],
        16
    );
    assert_eq!(demo.terminate(), Some(0));
}

#[test]
fn sighup_never_kills_a_process_of_ours() {
    // sim: nothing to reload; the signal is ignored.
    let mut cmd = bin();
    cmd.args(["sim", "storage", "--port", "0", "--host", "127.0.0.1"]);
    let mut sim = Proc::spawn(cmd);
    let line = sim.wait_for("sim service listening");
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr = v["addr"].as_str().unwrap().to_string();
    sim.signal("HUP");
    sim.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(sim.alive(), "SIGHUP killed sim");
    assert_eq!(http(&addr, "GET", "/products").unwrap().0, 200);
    assert_eq!(sim.terminate(), Some(0));

    // serve without a config file: SIGHUP reloads the embedded default.
    let mut cmd = bin();
    cmd.arg("serve").env("PORT", "0").env("ADMIN_PORT", "0");
    let (mut gw, addr, _) = serve(cmd);
    gw.signal("HUP");
    gw.wait_for("configuration reloaded");
    assert!(gw.alive(), "SIGHUP killed serve");
    assert_eq!(http(&addr, "GET", "/health").unwrap().0, 200);
    assert_eq!(gw.terminate(), Some(0));
}

/// `serve` with the open-file limit (soft and hard) lowered to `limit` before it starts.
fn serve_with_fd_limit(limit: u64, config: Option<&std::path::Path>) -> (Proc, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = bin();
    if let Some(file) = config {
        cmd.arg("--config").arg(file);
    }
    cmd.arg("serve").env("PORT", "0").env("ADMIN_PORT", "0");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    serve(cmd)
}

#[test]
fn default_caps_fit_a_lowered_open_file_limit_and_set_ones_are_warned_about() {
    let (mut gw, _, admin) = serve_with_fd_limit(2_000, None);
    let config = json(&admin, "/admin/config")["config"].clone();
    // (2,000 - 256 reserved - 64 admin connections) / 3, for each.
    assert_eq!(config["websocket"]["max_connections"], 560, "{config}");
    assert_eq!(config["limits"]["max_connections"], 560, "{config}");
    let log = gw.log().to_vec();
    let derived: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("derived from the open-file limit"))
        .collect();
    assert_eq!(derived.len(), 1, "{log:#?}");
    assert!(derived[0].contains("\"level\":\"INFO\""), "{}", derived[0]);
    assert!(
        !log.iter().any(|l| l.contains("\"level\":\"WARN\"")
            && (l.contains("open-file") || l.contains("caps lowered"))),
        "a stock start warned: {log:#?}"
    );
    // A reload derives the same caps again, without saying it twice, and does not take the
    // derived caps for a changed setting that needs a restart.
    let (status, body) = http(&admin, "POST", "/admin/reload").unwrap();
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["needs_restart"], serde_json::json!([]), "{body}");
    assert!(
        !gw.log()
            .iter()
            .any(|l| l.contains("only applied at the next start")),
        "{:#?}",
        gw.log()
    );
    assert_eq!(
        json(&admin, "/admin/config")["config"]["websocket"]["max_connections"],
        560
    );
    assert_eq!(
        gw.log()
            .iter()
            .filter(|l| l.contains("derived from the open-file limit"))
            .count(),
        1
    );
    assert_eq!(gw.terminate(), Some(0));

    // A cap that was set is the operator's: kept, and warned about when it does not fit.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("caps.toml");
    std::fs::write(&file, "[websocket]\nmax_connections = 5000\n").unwrap();
    let (mut gw, _, admin) = serve_with_fd_limit(2_000, Some(&file));
    let config = json(&admin, "/admin/config")["config"].clone();
    assert_eq!(config["websocket"]["max_connections"], 5000, "{config}");
    let log = gw.log().to_vec();
    assert!(
        log.iter()
            .any(|l| l.contains("\"level\":\"WARN\"") && l.contains("open-file limit")),
        "{log:#?}"
    );
    assert_eq!(gw.terminate(), Some(0));
}

/// The one `gateway_ratelimit_backend{state}` at 1 (each of the three states must be there).
fn limiter_backend(admin: &str) -> String {
    let (_, metrics) = http(admin, "GET", "/metrics").unwrap();
    let states: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_ratelimit_backend{"))
        .filter_map(|l| {
            let state = l.split("state=\"").nth(1)?.split('"').next()?;
            Some((state.to_string(), l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    assert_eq!(states.len(), 3, "{metrics}");
    let on: Vec<&(String, f64)> = states.iter().filter(|(_, v)| *v == 1.0).collect();
    assert_eq!(on.len(), 1, "{states:?}");
    assert!(
        states.iter().all(|(_, v)| *v == 0.0 || *v == 1.0),
        "{states:?}"
    );
    on[0].0.clone()
}

#[test]
fn no_redis_reads_local_a_failing_one_fallback_and_an_unanswered_instance_has_no_latency() {
    let dead = closed_port();
    let mut cmd = bin();
    cmd.arg("serve")
        .env("PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("STORAGE_SERVICE_URL", format!("http://127.0.0.1:{dead}"));
    let (gw, addr, admin) = serve(cmd);
    // The instance is tried (refused) and never answers.
    assert_eq!(
        http(&addr, "GET", "/api/data/underlying/NIFTY").unwrap().0,
        503
    );
    let upstreams = json(&admin, "/admin/upstreams");
    let storage = upstream(&upstreams, "storage");
    let instance = &storage["instances"][0];
    assert!(instance["failures"].as_u64().unwrap() > 0, "{storage}");
    assert_eq!(instance["ewma_latency_ms"], Value::Null, "{storage}");
    assert_eq!(limiter_backend(&admin), "local");
    assert_eq!(gw.terminate(), Some(0));

    // Redis configured but not there: that is the fallback.
    let mut cmd = bin();
    cmd.arg("serve")
        .env("PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", closed_port()));
    let (mut gw, _, admin) = serve(cmd);
    // The limiter decided its backend before the gateway listened: nothing to wait for.
    assert_eq!(limiter_backend(&admin), "fallback");
    assert!(gw.alive());
    drop(gw);
}
