//! Idle connections cannot get a memory-limited gateway killed: the real binary in a cgroup
//! limited to 64 MiB (a child cgroup of this test's own, as a container runtime would make)
//! lowers its connection cap at start, and 3,000 keep-alive clients leave it alive, within
//! its limit and holding at most the cap's connections (issue 18: a 64 MiB replica with the
//! cap at 10,000 was OOM-killed at ~2,400 idle connections).
//!
//! The limit is re-read while the gateway runs (issue 25: `docker update --memory 64m` on a
//! running replica, then idle connections, OOM-killed it under the cap derived at start):
//! lowering it lowers the cap of the running child, raising it raises the cap again.
//!
//! Needs a writable memory cgroup (root, cgroup v1 or v2 with delegation); where there is
//! none the test says so and passes without running, like the fuzz smoke without nightly.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::process::{serve_command, status_kib, GatewayProcess, BINARY};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: u64 = 64 << 20;

/// A child memory cgroup limited to `LIMIT`: its directory and the file a process joins by.
struct Cgroup {
    dir: PathBuf,
    procs: PathBuf,
    /// `memory.limit_in_bytes` (v1) or `memory.max` (v2).
    limit_file: PathBuf,
}

impl Cgroup {
    /// Bytes charged now (what the OOM killer compares with the limit).
    fn usage(&self) -> u64 {
        ["memory.usage_in_bytes", "memory.current"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// OOM kills in the cgroup (v1 `memory.oom_control`, v2 `memory.events`).
    fn oom_kills(&self) -> u64 {
        ["memory.oom_control", "memory.events"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.strip_prefix("oom_kill "))
                    .filter_map(|v| v.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

impl Cgroup {
    /// `tag` tells apart the cgroups of tests running at the same time.
    fn create(tag: &str) -> Result<Cgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("dsgw-memcap-{}-{tag}", std::process::id());
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            let (base, limit_file) = if controllers.split(',').any(|c| c == "memory") {
                (
                    format!("/sys/fs/cgroup/memory{path}"),
                    "memory.limit_in_bytes",
                )
            } else if controllers.is_empty() {
                (format!("/sys/fs/cgroup{path}"), "memory.max")
            } else {
                continue;
            };
            let dir = PathBuf::from(base).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            if std::fs::write(dir.join(limit_file), LIMIT.to_string()).is_err() {
                let _ = std::fs::remove_dir(&dir);
                continue;
            }
            return Ok(Cgroup {
                procs: dir.join("cgroup.procs"),
                limit_file: dir.join(limit_file),
                dir,
            });
        }
        Err("no writable memory cgroup".into())
    }
}

impl Cgroup {
    /// A new limit for the processes already in the cgroup, as `docker update --memory` does.
    fn set_limit(&self, bytes: u64) {
        std::fs::write(&self.limit_file, bytes.to_string()).expect("write the memory limit");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once the gateway has exited.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The gateway binary running in `cgroup` (`support::process` spawns it and keeps its log).
struct Gateway {
    process: GatewayProcess,
    pid: u32,
    addr: std::net::SocketAddr,
}

impl Gateway {
    async fn start(cgroup: &Cgroup) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            "[server]\nhost = \"127.0.0.1\"\nport = 0\n[admin]\nport = 0\n[cache]\nmax_bytes = \"8MiB\"\n",
        )
        .unwrap();
        let procs = cgroup.procs.clone();
        let mut cmd = serve_command(BINARY, &config);
        cmd.env("GATEWAY_WORKER_THREADS", "1");
        // SAFETY: between fork and exec the child only writes "0" (itself) to cgroup.procs.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        let process = tokio::task::block_in_place(|| GatewayProcess::start(cmd)).keeping(dir);
        Gateway {
            pid: process.pid(),
            addr: process.addr,
            process,
        }
    }

    fn log_lines(&self) -> Vec<String> {
        self.process.log_lines()
    }

    /// Waits up to `within` for a log line containing every one of `parts`.
    async fn logged(&self, parts: &[&str], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self
                .log_lines()
                .iter()
                .any(|l| parts.iter().all(|p| l.contains(p)))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `n` keep-alive clients, each asking once and then holding its connection; past the
    /// cap they wait in the accept queue (or the gateway sheds idle ones to make room).
    /// Returns the connections and how many were answered within 3 s.
    async fn hold_clients(&self, n: usize) -> (Vec<tokio::net::TcpStream>, usize) {
        let addr = self.addr;
        let clients: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                        return None;
                    };
                    let _ = s
                        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await;
                    let mut buf = [0u8; 512];
                    let answered = matches!(
                        tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await,
                        Ok(Ok(n)) if n > 0
                    );
                    Some((s, answered))
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut answered = 0;
        for c in clients {
            if let Some((s, a)) = c.await.unwrap() {
                answered += usize::from(a);
                held.push(s);
            }
        }
        (held, answered)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limited_gateway_caps_its_connections_and_survives_3000_clients() {
    let cgroup = match Cgroup::create("start") {
        Ok(c) => c,
        Err(why) => {
            eprintln!("NOT RUN: {why} (needs root and a memory cgroup)");
            return;
        }
    };
    let mut gw = Gateway::start(&cgroup).await;
    let pid = gw.pid;
    let log = gw.log_lines();
    // (64 - 24 - 8) MiB / 32 KiB = 1,024 connections for all listeners, 64 of them the
    // admin listener's.
    assert!(
        log.iter()
            // From 10000, or from what a lower open-file limit derived it to first.
            .any(|l| l.contains("caps lowered to fit the memory limit")
                && l.contains("limits.max_connections ")
                && l.contains(" -> 960")),
        "{log:?}"
    );

    // 3,000 keep-alive clients, each asking once and then holding its connection; past the
    // cap they wait in the accept queue (or the gateway sheds idle ones to make room).
    let (held, answered) = gw.hold_clients(3000).await;
    // Every client is connected now; look at the gateway while they all hold on. (VmRSS
    // counts the mapped pages of a debug binary too; the cgroup's charge is what matters.)
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    let fds = open_fds(pid);
    let charged = cgroup.usage();
    let ooms = cgroup.oom_kills();
    let exited = gw.process.child.try_wait().unwrap();
    drop(held);
    drop(gw);
    assert!(
        exited.is_none(),
        "the gateway died ({exited:?}): OOM-killed?"
    );
    assert!(
        answered >= 1000,
        "only {answered} of 3000 clients were served"
    );
    assert_eq!(ooms, 0, "the cgroup's OOM killer ran");
    assert!(charged <= LIMIT, "{charged} bytes charged");
    // The cap's connections, listeners, the runtime's own descriptors: not 3,000.
    assert!(fds <= 1024 + 64, "{fds} descriptors open");
    eprintln!(
        "3000 clients: {answered} answered, cgroup charge {} KiB, VmRSS {rss} KiB, {fds} fds",
        charged >> 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_changed_at_run_time_refits_the_cap_of_the_running_gateway() {
    let cgroup = match Cgroup::create("resize") {
        Ok(c) => c,
        Err(why) => {
            eprintln!("NOT RUN: {why} (needs root and a memory cgroup)");
            return;
        }
    };
    let mut gw = Gateway::start(&cgroup).await;
    assert!(
        gw.logged(&["limits.max_connections ", " -> 960"], Duration::ZERO)
            .await
    );

    // Lowered to 40 MiB while it runs: (40 - 24 - 8) MiB / 32 KiB = 256 connections, 32 of
    // them the admin listener's. Noticed within the 2 s poll (10 s: margin for a busy box).
    cgroup.set_limit(40 << 20);
    assert!(
        gw.logged(
            &[
                "memory limit changed at run time to 40 MiB",
                // From 10,000, or from the cap derived from a lower open-file limit.
                "limits.max_connections ",
                " -> 224"
            ],
            Duration::from_secs(10)
        )
        .await,
        "{:?}",
        gw.log_lines()
    );
    // 600 clients (the old cap would have taken every one): the gateway holds at most the new
    // cap's connections, keeps serving by shedding idle ones, and lives.
    let (held, answered) = gw.hold_clients(600).await;
    let fds = open_fds(gw.pid);
    assert!(
        gw.process.child.try_wait().unwrap().is_none(),
        "the gateway died: OOM-killed?"
    );
    assert_eq!(cgroup.oom_kills(), 0, "the cgroup's OOM killer ran");
    assert!(
        answered >= 200,
        "only {answered} of 600 clients were served"
    );
    // The new cap's connections, listeners, the runtime's own descriptors: not 600.
    assert!(
        fds <= 224 + 32 + 64,
        "{fds} descriptors open under a cap of 224"
    );
    drop(held);

    // Raised again: the cap follows, and 600 clients are all held at once.
    cgroup.set_limit(LIMIT);
    assert!(
        gw.logged(
            &[
                "connection caps raised",
                "limits.max_connections ",
                " -> 960"
            ],
            Duration::from_secs(10)
        )
        .await,
        "{:?}",
        gw.log_lines()
    );
    let (held, answered) = gw.hold_clients(600).await;
    let raised_fds = open_fds(gw.pid);
    drop(held);
    assert!(gw.process.child.try_wait().unwrap().is_none());
    assert_eq!(answered, 600);
    assert!(
        raised_fds >= 600,
        "{raised_fds} descriptors open under a cap of 960"
    );
    eprintln!("cap 224: {answered} of 600 answered, {fds} fds; cap 960: {raised_fds} fds");
}
