//! `deltastream-gateway`: serve (default) | check-config | demo | sim.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use deltastream_gateway::config::{redact_url, Config, ConfigErrors, RouteKind};
use deltastream_gateway::demo::{start_demo_from, DemoPorts};
use deltastream_gateway::sim::{self, Service, SimOptions};

#[derive(Parser)]
#[command(
    name = "deltastream-gateway",
    version,
    about = "Resilience-first API gateway for DeltaStream"
)]
struct Cli {
    /// TOML config file (extends the embedded DeltaStream default).
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `serve --help`: the environment variables (README, "Configuration"), which override the
/// config file.
const SERVE_ENV_HELP: &str = "\
Environment variables (override the config file):
  PORT                    public listener port [default: 8000]
  ADMIN_PORT              admin listener port, on 127.0.0.1 [default: 9000]
  SERVICE_NAME            reported by /health [default: api-gateway]
  AUTH_SERVICE_URL        upstreams.auth.url [default: http://auth:8001]
  STORAGE_SERVICE_URL     upstreams.storage.url; a comma-separated list is several instances
                          [default: http://storage:8003]
  ANALYTICS_SERVICE_URL   upstreams.analytics.url [default: http://analytics:8004]
  SOCKET_SERVICE_URL      upstreams.socket.url (WebSocket routes) [default: http://socket:8002]
  REDIS_URL               rate_limit.redis_url [default: unset: the in-process limiter]
  JWT_SECRET              auth.jwt_secret (local verification) [default: unset]
  CONFIG_FINGERPRINT_KEY  admin.fingerprint_key: the config fingerprint covers the secrets
                          [default: unset: a hash of the redacted configuration]
  GATEWAY_CONFIG          same as --config [default: unset: the embedded route table]
  GATEWAY_WORKER_THREADS  tokio worker threads; 1 = current-thread runtime [default: one per core]
  RUST_LOG                log filter (tracing env-filter syntax) [default: info]

Signals: SIGTERM/SIGINT drain for server.shutdown_grace, then exit; SIGHUP reloads the config file.";

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    #[command(after_help = SERVE_ENV_HELP)]
    Serve,
    /// Validate a config file and print the effective configuration (exit 0), or the
    /// errors (exit 2).
    CheckConfig {
        /// The file to check (or give it as --config; not both).
        file: Option<PathBuf>,
    },
    /// Run the four simulated services and the gateway in one process.
    Demo {
        /// Gateway port (env PORT).
        #[arg(long, env = "PORT", default_value_t = 8000)]
        port: u16,
        #[arg(long, env = "ADMIN_PORT", default_value_t = 9000)]
        admin_port: u16,
        #[arg(long, default_value_t = 8001)]
        auth_port: u16,
        #[arg(long, default_value_t = 8003)]
        storage_port: u16,
        #[arg(long, default_value_t = 8004)]
        analytics_port: u16,
        #[arg(long, default_value_t = 8002)]
        socket_port: u16,
        /// Storage simulators: the first on --storage-port, the others on free ports the
        /// system picks; the gateway's storage upstream becomes that many instances.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        storage_instances: u16,
        /// Enable the services' /_faults switches (latency, errors, hang, and the capacity
        /// fault: {"workers": N, "backlog": M} serves N requests at once, the rest wait FIFO,
        /// beyond M waiting a 503; see `sim --help`).
        #[arg(long)]
        faults: bool,
    },
    /// Run one simulated DeltaStream backend.
    Sim {
        /// auth | storage | analytics | socket
        service: Service,
        /// Listen port (default 8001 / 8003 / 8004 / 8002).
        #[arg(long)]
        port: Option<u16>,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0")]
        host: std::net::IpAddr,
        /// Enable POST/GET/DELETE /_faults for chaos experiments: {"latency_ms", "jitter_ms",
        /// "error_rate", "error_status", "hang", "workers", "backlog"}. workers = N (0 =
        /// unlimited) serves N requests at once, each holding its worker for latency_ms +
        /// jitter, the rest waiting in a FIFO backlog like gunicorn sync workers (16 x 200 ms =
        /// 80 req/s); past `backlog` waiting requests (null = unbounded) a 503 {"error":
        /// "backlog full"} at once. /health and /_faults are never queued; GET /_faults also
        /// shows "state": {busy, queued, served, refused}. The socket service adds POST
        /// /_faults/drop (close every WebSocket abruptly).
        #[arg(long)]
        faults: bool,
        /// Seed of the synthetic market data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// socket: time between two ticks of each subscribed product.
        #[arg(long, default_value = "250ms", value_parser = positive_duration)]
        tick_interval: std::time::Duration,
    },
    /// GET a URL and exit 0 on a 2xx answer, 1 otherwise: the container health check of
    /// images that have no curl (FROM scratch).
    Probe {
        /// The URL, e.g. http://127.0.0.1:8000/health
        url: String,
        /// Give up after this long.
        #[arg(long, default_value = "2s")]
        timeout: humantime::Duration,
    },
}

/// With the `mimalloc` feature (the default), mimalloc serves every allocation (see
/// Cargo.toml).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ignore_hangup();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `--config` typed on the command line (not GATEWAY_CONFIG), wherever it was placed.
    let config_typed = std::iter::successors(Some(&matches), |m| m.subcommand().map(|(_, m)| m))
        .any(|m| m.value_source("config") == Some(clap::parser::ValueSource::CommandLine));
    let command = cli.command.unwrap_or(Command::Serve);
    // check-config talks to a person on stdout/stderr; everything else logs JSON.
    if !matches!(command, Command::CheckConfig { .. } | Command::Probe { .. }) {
        deltastream_gateway::observability::init_logging();
    }
    match command {
        Command::CheckConfig { file } => match checked_file(file, cli.config, config_typed) {
            Ok(file) => check_config(&file),
            Err(message) => {
                eprintln!("check-config: {message}");
                ExitCode::from(2)
            }
        },
        Command::Probe { url, timeout } => probe(&url, timeout.into()),
        Command::Serve => {
            let cfg = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let source = deltastream_gateway::server::ConfigSource {
                file: cli.config.clone(),
                env: true,
            };
            run(deltastream_gateway::server::serve(cfg, source))
        }
        Command::Demo {
            port,
            admin_port,
            auth_port,
            storage_port,
            analytics_port,
            socket_port,
            storage_instances,
            faults,
        } => {
            let cfg = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ports = DemoPorts {
                gateway: port,
                admin: admin_port,
                auth: auth_port,
                storage: storage_port,
                analytics: analytics_port,
                socket: socket_port,
                storage_instances,
            };
            // Reloads read what the demo started from: the file (or the embedded table), then
            // the environment.
            let source = deltastream_gateway::server::ConfigSource {
                file: cli.config.clone(),
                env: true,
            };
            run(async move {
                let demo = start_demo_from(cfg, Some(source), ports, faults).await?;
                // Installed before the banner says the demo is up (see `signal`).
                let stop = deltastream_gateway::server::signal();
                deltastream_gateway::server::reload_on_sighup(demo.gateway.gateway.clone());
                println!("{}", demo.banner());
                stop.await;
                // The same lines as `serve`, so a script or a reader sees the drain.
                tracing::info!("shutdown signal received; draining in-flight requests");
                demo.shutdown().await;
                tracing::info!("gateway stopped");
                Ok(())
            })
        }
        Command::Sim {
            service,
            port,
            host,
            faults,
            seed,
            tick_interval,
        } => {
            let opts = SimOptions {
                faults,
                seed,
                tick_interval,
                ..SimOptions::default()
            };
            let port = port.unwrap_or(service.default_port());
            run(async move {
                let listener = tokio::net::TcpListener::bind((host, port))
                    .await
                    .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
                sim::serve(
                    service,
                    listener,
                    opts,
                    deltastream_gateway::server::signal(),
                )
                .await
                .map_err(|e| e.to_string())
            })
        }
    }
}

/// SIGHUP's default action ends the process. Ignored from the first line of `main`, so a
/// reload signal that comes early, or to a process with nothing to reload (`sim`, `probe`),
/// never kills one of ours; `serve` and `demo` then handle it (tokio's handler replaces this
/// one, see `server::reload_on_sighup`). Nothing we run is exec'd, so no child inherits it.
fn ignore_hangup() {
    #[cfg(unix)]
    // SAFETY: installs SIG_IGN for one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// The one file `check-config` checks: the argument or `--config`. Both typed on the command
/// line is ambiguous (which one did the operator mean?) unless they are the same; a
/// `GATEWAY_CONFIG` in the environment gives way to the argument.
fn checked_file(
    argument: Option<PathBuf>,
    config: Option<PathBuf>,
    config_typed: bool,
) -> Result<PathBuf, String> {
    match (argument, config) {
        (Some(a), Some(c)) if config_typed && a != c => Err(format!(
            "two files given ({} and --config {}): give one, as `check-config FILE`",
            a.display(),
            c.display()
        )),
        (Some(a), _) => Ok(a),
        (None, Some(c)) => Ok(c),
        (None, None) => Err("no file given: `check-config FILE`".into()),
    }
}

/// A humantime duration above zero (`250ms`, `1s`): a zero tick interval would be a busy loop.
fn positive_duration(raw: &str) -> Result<std::time::Duration, String> {
    let duration: std::time::Duration = raw
        .parse::<humantime::Duration>()
        .map_err(|e| e.to_string())?
        .into();
    if duration.is_zero() {
        return Err("must be more than 0, e.g. 250ms".into());
    }
    Ok(duration)
}

/// The effective configuration (file or embedded default, then the environment), checked.
/// Every error at once: a bad environment variable does not hide the file's problems.
fn load_checked(file: Option<&std::path::Path>) -> Result<Config, ConfigErrors> {
    let mut cfg = match file {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded(),
    };
    // The variables that parse are applied even when another does not.
    let mut errors = match cfg.apply_env(|k| std::env::var(k).ok()) {
        Ok(()) => Vec::new(),
        Err(e) => e.0,
    };
    if let Err(mut e) = deltastream_gateway::server::check(&cfg) {
        errors.append(&mut e.0);
    }
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn load(file: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    load_checked(file).map_err(|e| {
        eprintln!("invalid configuration:\n{e}");
        ExitCode::from(2)
    })
}

/// A few lines describing the effective configuration, for `check-config` and startup; the
/// user information of every URL in it masked, whichever field it came from.
fn summary(cfg: &Config) -> String {
    let tls = match &cfg.server.tls {
        Some(t) => format!(" (TLS {}+, h2 and http/1.1)", t.min_version),
        None => String::new(),
    };
    let mut s = format!(
        "service {:?}: public {}:{}{tls}, admin {}:{}\n",
        cfg.service_name, cfg.server.host, cfg.server.port, cfg.admin.host, cfg.admin.port
    );
    s.push_str(&format!("upstreams ({}):\n", cfg.upstreams.len()));
    for (name, u) in &cfg.upstreams {
        s.push_str(&format!(
            "  {name:<10} {} (timeout {})\n",
            u.targets().join(", "),
            u.timeout
        ));
    }
    s.push_str(&format!(
        "rate limiting: {}; policies: {}\n",
        match &cfg.rate_limit.redis_url {
            Some(url) => format!("Redis at {}", redact_url(url)),
            None => "in-process (no REDIS_URL)".to_string(),
        },
        cfg.rate_limit
            .policies
            .iter()
            .map(|p| format!("{} {}/{} per {}", p.name, p.limit, p.window, p.key))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str(&format!(
        "cache: {} total, {} per entry; auth: {:?}\n",
        cfg.cache.max_bytes, cfg.cache.max_entry_bytes, cfg.auth.mode
    ));
    s.push_str(&format!("routes ({}):\n", cfg.routes.len()));
    for r in &cfg.routes {
        let target = match (r.kind, &r.upstream) {
            (RouteKind::UserMe, _) => "token verification only".to_string(),
            (RouteKind::Websocket, Some(u)) => format!(
                "websocket {u} {}",
                r.upstream_path.as_deref().unwrap_or(r.path.as_str())
            ),
            (RouteKind::Proxy, Some(u)) => format!(
                "{u} {}",
                r.upstream_path.as_deref().unwrap_or(r.path.as_str())
            ),
            (RouteKind::Proxy | RouteKind::Websocket, None) => "?".into(),
        };
        let mut extras = Vec::new();
        if r.auth {
            extras.push("auth".to_string());
        }
        if let Some(c) = &r.cache {
            extras.push(format!("cache {}", c.ttl));
        }
        if !r.rate_limit.is_empty() {
            extras.push(format!("rate_limit={}", r.rate_limit.join("+")));
        }
        s.push_str(&format!(
            "  {:<8} {:<45} -> {target}{}\n",
            r.methods.join(","),
            r.path,
            if extras.is_empty() {
                String::new()
            } else {
                format!(" [{}]", extras.join(", "))
            }
        ));
    }
    redact_url(&s)
}

/// The runtime: multi-threaded (one worker per core) unless `GATEWAY_WORKER_THREADS` says
/// otherwise; `1` gives a current-thread runtime, which is what a gateway pinned to one core
/// (sidecar, benchmark) wants: no work stealing, no cross-thread wake-ups.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("GATEWAY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    // An idle thread hands its allocator's free memory back (`server::memory::on_idle`).
    let idle = deltastream_gateway::server::memory::on_idle;
    match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(idle)
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .on_thread_park(idle)
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_park(idle)
            .build(),
    }
}

fn run(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime would wait for every blocking task (a DNS lookup that hangs, a
    // file read): the shutdown deadline holds whatever is still running.
    rt.shutdown_timeout(deltastream_gateway::server::HARD_STOP_AFTER_GRACE);
    deltastream_gateway::observability::flush_logs();
    code
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match load_checked(Some(file)) {
        Ok(cfg) => {
            // Worth knowing, not worth refusing (an expired certificate: see the README).
            if let Ok(warnings) = deltastream_gateway::server::check_with_warnings(&cfg) {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            // A reader that stops early (`check-config FILE | head`) is not an error of ours;
            // println! would panic on the broken pipe.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}: OK\n{}", file.display(), summary(&cfg)) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("cannot write the summary: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("{}: invalid configuration:\n{e}", file.display());
            ExitCode::from(2)
        }
    }
}

fn probe(url: &str, timeout: std::time::Duration) -> ExitCode {
    // Plain http (the health check's case) takes one blocking socket: no runtime, no client,
    // no TLS roots. A container's health check runs inside its CPU quota, so what it costs
    // comes out of what the gateway has when it is already short (issue 24 item 5).
    let outcome = match reqwest::Url::parse(url) {
        Ok(parsed) if parsed.scheme() == "http" => probe_plain(&parsed, timeout),
        Ok(_) => probe_client(url, timeout),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(status) if (200..300).contains(&status) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{url}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One `GET` over a blocking TCP socket, everything within `timeout`: the status code.
fn probe_plain(url: &reqwest::Url, timeout: std::time::Duration) -> Result<u16, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {}ms", timeout.as_millis()))
    };
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, left()?).map_err(|e| e.to_string())?;
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: deltastream-gateway-probe\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line is all a probe needs: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(format!("no answer within {}ms", timeout.as_millis()))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<u16>().ok()),
    ) {
        (Some(v), Some(status)) if v.starts_with("HTTP/1.") => Ok(status),
        _ => Err(format!("not an HTTP answer: {:?}", line.trim_end())),
    }
}

/// Any other scheme (https): the full client.
fn probe_client(url: &str, timeout: std::time::Duration) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    })
}
