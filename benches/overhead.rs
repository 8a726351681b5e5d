//! What the resilience pipeline and the rate limiter cost per request, measured (not asserted).
//!
//!   cargo bench --bench overhead            # release build; prints a Markdown table
//!
//! 1. Pipeline overhead: the same GET to an in-process loopback server through a bare
//!    `reqwest::Client` and through `Pipeline::send` (retry + budget + attempt record +
//!    breaker + attempt timeout), sequential, alternating rounds; p50/p99 per request.
//! 2. Rate-limit decisions: `RateLimiter::check` with the in-process limiter, and against a
//!    `redis-server` this bench starts on a free loopback port (one round trip per decision).
//!
//! Every loop is bounded by a request count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deltastream_gateway::config::Dur;
use deltastream_gateway::config::UpstreamConfig;
use deltastream_gateway::config::{KeySource, PolicyConfig, RateLimitConfig};
use deltastream_gateway::ratelimit::{RateLimiter, Subject};
use deltastream_gateway::upstream::{CallOptions, Pipeline};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

const ROUNDS: usize = 5;
const PER_ROUND: usize = 4_000;

async fn start_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(br#"{"product":"NIFTY","price":24428.15}"#),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut samples: Vec<Duration>, total: Duration) -> Stats {
    samples.sort();
    Stats {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        per_sec: samples.len() as f64 / total.as_secs_f64(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn bare_round(client: &reqwest::Client, url: &str, out: &mut Vec<Duration>) -> Duration {
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        let t = Instant::now();
        let r = client.get(url).send().await.unwrap();
        let _ = r.bytes().await.unwrap();
        out.push(t.elapsed());
    }
    start.elapsed()
}

async fn pipeline_round(p: &Pipeline, url: &reqwest::Url, out: &mut Vec<Duration>) -> Duration {
    let call = CallOptions {
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(10),
        idempotent: true,
        retry_non_idempotent: false,
        max_retries: None,
        hedge_after: None,
    };
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        let t = Instant::now();
        let req = reqwest::Request::new(reqwest::Method::GET, url.clone());
        let d = p.send(req, call).await.unwrap();
        let _ = d.response.bytes().await.unwrap();
        out.push(t.elapsed());
    }
    start.elapsed()
}

async fn limiter_round(rl: &RateLimiter, n: usize, out: &mut Vec<Duration>) -> Duration {
    let policy = rl.policy("bench").unwrap();
    let headers = http::HeaderMap::new();
    let start = Instant::now();
    for i in 0..n {
        // Many subjects, as in real traffic (one key per client address).
        let ip = std::net::IpAddr::from([10, 0, (i / 256 % 256) as u8, (i % 256) as u8]);
        let subject = Subject {
            client: deltastream_gateway::client::ClientKey::new(ip, 64),
            user_id: None,
            headers: &headers,
            route: "/api/data/underlying/{product}",
        };
        let t = Instant::now();
        let d = rl.check(&[policy], &subject).await;
        std::hint::black_box(d.allowed);
        out.push(t.elapsed());
    }
    start.elapsed()
}

fn limiter_config(redis_url: Option<String>) -> RateLimitConfig {
    RateLimitConfig {
        redis_url,
        command_timeout: Dur::from_secs(1),
        connect_timeout: Dur::from_secs(1),
        policies: vec![PolicyConfig {
            name: "bench".into(),
            limit: 1_000_000,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        }],
        ..RateLimitConfig::default()
    }
}

fn start_redis() -> Option<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, port))
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = start_backend().await;
        let url = format!("http://{addr}/underlying/NIFTY");
        let client = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        let cfg = UpstreamConfig {
            url: format!("http://{addr}"),
            ..UpstreamConfig::default()
        };
        let pipeline = Pipeline::new("bench", &cfg).expect("valid upstream");
        let parsed = reqwest::Url::parse(&url).unwrap();
        // Warm-up: connections pooled, code paths hot.
        let mut sink = Vec::new();
        bare_round(&client, &url, &mut sink).await;
        pipeline_round(&pipeline, &parsed, &mut sink).await;
        let (mut bare, mut piped) = (Vec::new(), Vec::new());
        let (mut bare_t, mut piped_t) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..ROUNDS {
            bare_t += bare_round(&client, &url, &mut bare).await;
            piped_t += pipeline_round(&pipeline, &parsed, &mut piped).await;
        }
        let b = stats(bare, bare_t);
        let p = stats(piped, piped_t);
        println!("## Pipeline overhead over a bare reqwest call ({} requests each, loopback, one thread)\n", ROUNDS * PER_ROUND);
        println!("| path | req/s | p50 µs | p99 µs |\n|---|---|---|---|");
        println!("| bare reqwest | {:.0} | {:.1} | {:.1} |", b.per_sec, us(b.p50), us(b.p99));
        println!("| Pipeline::send | {:.0} | {:.1} | {:.1} |", p.per_sec, us(p.p50), us(p.p99));
        println!(
            "\noverhead per request: p50 {:+.1} µs, p99 {:+.1} µs, throughput {:+.1}%\n",
            us(p.p50) - us(b.p50),
            us(p.p99) - us(b.p99),
            (p.per_sec / b.per_sec - 1.0) * 100.0
        );

        println!("## Rate-limit decisions (`RateLimiter::check`, one policy, sequential)\n");
        println!("| backend | decisions/s | p50 µs | p99 µs |\n|---|---|---|---|");
        let local = RateLimiter::new(&limiter_config(None)).await;
        limiter_round(&local, 10_000, &mut Vec::new()).await;
        let mut samples = Vec::new();
        let t = limiter_round(&local, 50_000, &mut samples).await;
        let s = stats(samples, t);
        println!("| in-process | {:.0} | {:.2} | {:.2} |", s.per_sec, us(s.p50), us(s.p99));
        match start_redis() {
            Some((mut child, port)) => {
                let rl = RateLimiter::new(&limiter_config(Some(format!("redis://127.0.0.1:{port}")))).await;
                limiter_round(&rl, 2_000, &mut Vec::new()).await;
                let mut samples = Vec::new();
                let t = limiter_round(&rl, 20_000, &mut samples).await;
                let s = stats(samples, t);
                println!("| Redis on loopback (1 round trip) | {:.0} | {:.1} | {:.1} |", s.per_sec, us(s.p50), us(s.p99));
                let _ = child.kill();
                let _ = child.wait();
            }
            None => println!("| Redis | not measured: redis-server not installed (scripts/test installs it) | | |"),
        }
    });
}
