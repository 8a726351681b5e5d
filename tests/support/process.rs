//! The gateway binary as a child process: `serve --config FILE` with the environment that
//! would override the file removed, its stdout and stderr kept line by line, the addresses it
//! announces read from its `gateway listening` log line, and the process killed when dropped.
//! For what only the real process shows: its log, resident memory, limits set on it
//! (descriptors, a cgroup), signals.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_deltastream-gateway");

/// How long a child may take to announce its listeners (a busy 2-core machine).
const START_PATIENCE: Duration = Duration::from_secs(20);

/// `bin serve --config config` at `RUST_LOG=info`, without the variables that would override
/// the file (ports, upstream URLs, Redis, another config). Callers add to it before
/// [`GatewayProcess::start`].
pub fn serve_command(bin: &str, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("PORT")
        .env_remove("ADMIN_PORT")
        .env_remove("REDIS_URL")
        .env_remove("AUTH_SERVICE_URL")
        .env_remove("STORAGE_SERVICE_URL")
        .env_remove("ANALYTICS_SERVICE_URL")
        .env_remove("SOCKET_SERVICE_URL")
        .env_remove("GATEWAY_CONFIG");
    cmd
}

/// A running gateway process; killed (and reaped) when dropped.
pub struct GatewayProcess {
    pub child: Child,
    /// The public listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The http->https redirect listener, when configured.
    pub redirect: Option<SocketAddr>,
    /// Every line of stdout and stderr so far.
    log: Arc<Mutex<Vec<String>>>,
    /// Files the process reads (its config, certificates), deleted after it is gone.
    _files: Option<tempfile::TempDir>,
}

impl GatewayProcess {
    /// Spawns `cmd` with stdout and stderr captured and waits for its `gateway listening`
    /// line; panics with the log if none comes in time.
    pub fn start(mut cmd: Command) -> GatewayProcess {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + START_PATIENCE;
        let line = loop {
            let found = log.lock().unwrap().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["message"] == "gateway listening").then_some(v)
            });
            if let Some(v) = found {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr_of = |k: &str| line[k].as_str().and_then(|a| a.parse().ok());
        GatewayProcess {
            addr: addr_of("addr").expect("addr in the listening line"),
            admin: addr_of("admin").expect("admin in the listening line"),
            redirect: addr_of("redirect"),
            child,
            log,
            _files: None,
        }
    }

    /// Keeps `dir` (the files the process reads) until the process is gone.
    pub fn keeping(mut self, dir: tempfile::TempDir) -> GatewayProcess {
        self._files = Some(dir);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Resident memory now (`VmRSS`), KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS").expect("VmRSS")
    }

    /// Peak resident memory since start (`VmHWM`), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM").expect("VmHWM")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Then `_files` goes.
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`); `None` once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
