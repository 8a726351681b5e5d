//! The real binary: `serve` with zero files answers /health, and SIGTERM drains and exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn serve_runs_with_zero_files_and_sigterm_exits_0() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .arg("serve")
        .env("PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("SERVICE_NAME", "signal-test")
        .env("RUST_LOG", "info")
        .env_remove("REDIS_URL")
        .env_remove("GATEWAY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    // The startup log line names the bound address (PORT=0 picks a free one).
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut addr = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("gateway listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            addr = v["addr"]
                .as_str()
                .map(|a| a.replace("0.0.0.0", "127.0.0.1"));
            break;
        }
    }
    let addr = addr.expect("no 'gateway listening' log line");
    let health = http_get(&addr, "/health").expect("health answered");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.ends_with(r#"{"status":"healthy","service":"signal-test"}"#),
        "{health}"
    );
    // The default upstreams (auth:8001 ...) do not resolve here: an honest 503.
    let data = http_get(&addr, "/api/data/underlying/NIFTY").unwrap();
    assert!(data.starts_with("HTTP/1.1 503"), "{data}");

    // The rest of the log must mention the shutdown.
    let rest = terminate(child, lines);
    assert!(
        rest.iter().any(|l| l.contains("gateway stopped")),
        "{rest:?}"
    );
}

/// A config file with one extra route (`path`); `watch` turns the file watch on.
fn reload_config(path: &str, watch: bool) -> String {
    format!(
        r#"
[server]
host = "127.0.0.1"
port = 0
watch_config = {watch}
[admin]
port = 0
[upstreams.storage]
url = "http://127.0.0.1:9"
[[routes]]
path = "{path}"
upstream = "storage"
"#
    )
}

/// Starts `serve --config FILE`; the child and its public address.
#[allow(clippy::zombie_processes)] // the caller kills and waits for it
fn serve_with(file: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .args(["--config"])
        .arg(file)
        .arg("serve")
        .env("RUST_LOG", "info")
        .env_remove("PORT")
        .env_remove("ADMIN_PORT")
        .env_remove("REDIS_URL")
        .env_remove("GATEWAY_CONFIG")
        .env_remove("STORAGE_SERVICE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("gateway listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let addr = v["addr"].as_str().unwrap().to_string();
            // Keep reading the log so the pipe never fills.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return (child, addr);
        }
    }
    panic!("no 'gateway listening' log line");
}

/// Waits (bounded) until `path` is routed (anything but 404).
fn routed_within(addr: &str, path: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(r) = http_get(addr, path) {
            if !r.starts_with("HTTP/1.1 404") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn sighup_and_the_file_watch_reload_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, reload_config("/api/first", false)).unwrap();
    let (mut child, addr) = serve_with(&file);
    assert!(routed_within(&addr, "/api/first", Duration::from_secs(5)));
    assert!(http_get(&addr, "/api/second")
        .unwrap()
        .starts_with("HTTP/1.1 404"));
    // SIGHUP: the edited file is applied.
    std::fs::write(&file, reload_config("/api/second", false)).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        routed_within(&addr, "/api/second", Duration::from_secs(5)),
        "SIGHUP did not reload"
    );
    assert!(http_get(&addr, "/api/first")
        .unwrap()
        .starts_with("HTTP/1.1 404"));
    let _ = child.kill();
    let _ = child.wait();

    // watch_config: an edit is picked up without a signal (polled every second).
    std::fs::write(&file, reload_config("/api/third", true)).unwrap();
    let (mut child, addr) = serve_with(&file);
    assert!(routed_within(&addr, "/api/third", Duration::from_secs(5)));
    std::fs::write(&file, reload_config("/api/fourth", true)).unwrap();
    assert!(
        routed_within(&addr, "/api/fourth", Duration::from_secs(10)),
        "the file watch did not reload"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn demo_logs_its_shutdown_like_serve() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .args([
            "demo",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--auth-port",
            "0",
        ])
        .args([
            "--storage-port",
            "0",
            "--analytics-port",
            "0",
            "--socket-port",
            "0",
        ])
        .env("RUST_LOG", "info")
        .env_remove("REDIS_URL")
        .env_remove("GATEWAY_CONFIG")
        .env_remove("PORT")
        .env_remove("ADMIN_PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("DeltaStream demo is running") {
            break;
        }
    }
    let rest = terminate(child, lines);
    for expected in ["shutdown signal received", "gateway stopped"] {
        assert!(
            rest.iter().any(|l| l.contains(expected)),
            "{expected:?} not logged: {rest:?}"
        );
    }
}

/// Sends SIGTERM, expects exit 0 within 20 s, and returns the rest of the log.
fn terminate(
    mut child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
) -> Vec<String> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert_eq!(code.code(), Some(0), "exit status after SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    lines.map_while(Result::ok).collect()
}
