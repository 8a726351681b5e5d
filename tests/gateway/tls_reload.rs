//! TLS with HTTP/2 on the public listener, and reloading the configuration without a restart:
//! against the real gateway, with certificates made at test time (rcgen: a test CA and leaves
//! signed by it; no private key is committed) and reqwest clients that trust only that CA.

use crate::support;

use std::path::{Path, PathBuf};

use deltastream_gateway::config::{BreakerConfig, Config, Dur};
use deltastream_gateway::server::{
    check_with_warnings, start_with_source, tls::certificate_serial, ConfigSource, Running,
};
use serde_json::Value;
use support::gateway::{client, scrape};
use support::tls::Ca;
use support::{refused_addr, FakeUpstream};
use tokio::net::TcpListener;

/// The serial of the certificate the server presented for this response.
fn served_serial(r: &reqwest::Response) -> String {
    let info = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    certificate_serial(info.peer_certificate().expect("a peer certificate"))
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        // Write then rename, as an operator's deploy tool would: a reader never sees half.
        let tmp = self.path(&format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }
}

/// A gateway config file: every upstream at `up`, the limits lifted, TLS from `tls` (cert,
/// key), and an extra route `extra` to storage.
fn config_text(up: &str, tls: Option<(&Path, &Path)>, extra: &str, extra_toml: &str) -> String {
    let tls = match tls {
        Some((c, k)) => format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            c.display(),
            k.display()
        ),
        None => String::new(),
    };
    format!(
        r#"
[server]
host = "127.0.0.1"
shutdown_grace = "2s"
{tls}
{extra_toml}
[upstreams.auth]
url = "{up}"
[upstreams.storage]
url = "{up}"
[upstreams.analytics]
url = "{up}"
[upstreams.socket]
url = "{up}"
[[rate_limit.policies]]
name = "default"
limit = 1000000
[[rate_limit.policies]]
name = "auth"
limit = 1000000
[[routes]]
path = "{extra}"
upstream = "storage"
upstream_path = "/products"
"#
    )
}

async fn start(file: &Path) -> Running {
    let source = ConfigSource {
        file: Some(file.to_path_buf()),
        env: false,
    };
    let cfg = source.load().expect("config loads");
    deltastream_gateway::server::check(&cfg).expect("valid");
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with_source(cfg, source, public, admin)
        .await
        .expect("gateway starts")
}

async fn reload(gw: &Running) -> (u16, Value) {
    let r = client()
        .post(format!("http://{}/admin/reload", gw.admin_addr))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_h2_and_http1_and_plain_http_on_the_tls_port_is_refused_cleanly() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let files = Files::new();
    let (cert, key) = ca.leaf(0x0a, false);
    let (c, k) = (files.write("cert.pem", &cert), files.write("key.pem", &key));
    let cfg = files.write(
        "gw.toml",
        &config_text(&up.url(), Some((&c, &k)), "/api/x", ""),
    );
    let gw = start(&cfg).await;
    assert!(gw.url().starts_with("https://"));
    let url = format!("https://127.0.0.1:{}/api/data/products", gw.addr.port());
    let r = ca.client(true).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(served_serial(&r), "0a");
    let r = ca.client(false).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    // Plain HTTP to the TLS port: a readable 400, then the connection closes.
    let responses = support::raw::exchange(
        gw.addr,
        b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    let first = responses.first().expect("an answer");
    assert_eq!(first.status, 400);
    assert!(first.body_text().contains("HTTPS"), "{}", first.body_text());
    // A client that does not trust the CA gets no further than the handshake.
    let err = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .expect_err("untrusted");
    assert!(
        err.is_connect() || err.to_string().contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_field_errors_and_an_expired_one_a_warning() {
    let ca = Ca::new();
    let other = Ca::new();
    let files = Files::new();
    let (cert, key) = ca.leaf(1, false);
    let (_, other_key) = other.leaf(2, false);
    let (old_cert, old_key) = ca.leaf(3, true);
    let c = files.write("cert.pem", &cert);
    let k = files.write("key.pem", &key);
    let wrong_key = files.write("other-key.pem", &other_key);
    let garbage = files.write("garbage.pem", "not a certificate\n");
    let missing = files.path("missing.pem");
    let check = |cert: &Path, key: &Path| {
        let text = config_text("http://127.0.0.1:9", Some((cert, key)), "/api/x", "");
        let cfg = Config::from_toml(&text).unwrap();
        check_with_warnings(&cfg)
    };
    let errors = |r: Result<Vec<String>, deltastream_gateway::config::ConfigErrors>| {
        r.expect_err("refused")
            .0
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    };
    let e = errors(check(&missing, &k));
    assert!(
        e.iter()
            .any(|m| m.starts_with("server.tls.cert_file: cannot read")),
        "{e:?}"
    );
    let e = errors(check(&c, &missing));
    assert!(
        e.iter()
            .any(|m| m.starts_with("server.tls.key_file: cannot read")),
        "{e:?}"
    );
    let e = errors(check(&garbage, &k));
    assert!(
        e.iter().any(|m| m.starts_with("server.tls.cert_file:")),
        "{e:?}"
    );
    let e = errors(check(&c, &wrong_key));
    assert!(
        e.iter()
            .any(|m| m.starts_with("server.tls.key_file:") && m.contains("does not match")),
        "{e:?}"
    );
    assert!(check(&c, &k).expect("valid").is_empty());
    let (oc, ok) = (
        files.write("old.pem", &old_cert),
        files.write("old-key.pem", &old_key),
    );
    let warnings = check(&oc, &ok).expect("an expired certificate is a warning, not an error");
    assert!(
        warnings.iter().any(|w| w.contains("expired")),
        "{warnings:?}"
    );
    // The binary says the same words: check-config exits 2, serve exits 2.
    let text = config_text("http://127.0.0.1:9", Some((&c, &wrong_key)), "/api/x", "");
    let bad = files.write("bad.toml", &text);
    for args in [
        vec!["check-config", bad.to_str().unwrap()],
        vec!["--config", bad.to_str().unwrap(), "serve"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
            .args(&args)
            .env_remove("GATEWAY_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("server.tls.key_file") && stderr.contains("does not match"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_served_to_new_handshakes_and_open_connections_continue() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let files = Files::new();
    let (cert, key) = ca.leaf(0x11, false);
    let (c, k) = (files.write("cert.pem", &cert), files.write("key.pem", &key));
    let cfg = files.write(
        "gw.toml",
        &config_text(&up.url(), Some((&c, &k)), "/api/x", ""),
    );
    let gw = start(&cfg).await;
    let url = format!("https://127.0.0.1:{}/api/data/products", gw.addr.port());
    let old_client = ca.client(true);
    let r = old_client.get(&url).send().await.unwrap();
    assert_eq!(served_serial(&r), "11");
    // Rotate: new files, then reload.
    let (cert2, key2) = ca.leaf(0x22, false);
    files.write("cert.pem", &cert2);
    files.write("key.pem", &key2);
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    let r = ca.client(true).get(&url).send().await.unwrap();
    assert_eq!(
        served_serial(&r),
        "22",
        "a new handshake presents the new certificate"
    );
    // The connection opened before the reload goes on, with the certificate it got.
    for _ in 0..3 {
        let r = old_client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(served_serial(&r), "11");
    }
    let described: Value = client()
        .get(format!("http://{}/admin/config", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(described["tls_certificate_serial"], "22");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_valid_file_keeps_unrelated_breakers_and_refuses_an_invalid_one() {
    let up = FakeUpstream::ok().await;
    let dead = refused_addr().await;
    let files = Files::new();
    let text = |extra: &str, analytics_timeout: &str| {
        config_text(&up.url(), None, extra, "")
            .replace(
                &format!("[upstreams.analytics]\nurl = \"{}\"", up.url()),
                &format!("[upstreams.analytics]\nurl = \"http://{dead}\"\ntimeout = \"{analytics_timeout}\"\n[upstreams.analytics.breaker]\nopen_base = \"60s\"\nopen_max = \"60s\""),
            )
    };
    let cfg = files.write("gw.toml", &text("/api/one", "30s"));
    let gw = start(&cfg).await;
    let c = client();
    let base = gw.url();
    let sha_at = |gw: &Running| {
        let addr = gw.admin_addr;
        async move {
            let v: Value = client()
                .get(format!("http://{addr}/admin/config"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["sha256"].as_str().unwrap().to_string()
        }
    };
    let first_sha = sha_at(&gw).await;
    assert_eq!(
        c.get(format!("{base}/api/one"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Open the analytics breaker (its upstream is refused).
    for _ in 0..6 {
        let _ = c
            .get(format!("{base}/api/analytics/pcr/NIFTY"))
            .send()
            .await
            .unwrap();
    }
    let breaker_state = |gw: &Running| {
        gw.state().upstreams[gw.state().upstream_index("analytics").unwrap()]
            .pipeline
            .breaker()
            .state()
    };
    assert_eq!(
        breaker_state(&gw),
        deltastream_gateway::upstream::BreakerState::Open
    );
    // A new route and a changed storage upstream; analytics unchanged: its breaker stays open.
    files.write(
        "gw.toml",
        &text("/api/two", "30s").replace(
            &format!("[upstreams.storage]\nurl = \"{}\"", up.url()),
            &format!(
                "[upstreams.storage]\nurl = \"{}\"\ntimeout = \"9s\"",
                up.url()
            ),
        ),
    );
    let (status, report) = reload(&gw).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "applied");
    assert!(
        report["changed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "routes"),
        "{report}"
    );
    assert_eq!(
        c.get(format!("{base}/api/two"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/api/one"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        breaker_state(&gw),
        deltastream_gateway::upstream::BreakerState::Open,
        "an unrelated upstream's breaker was reset"
    );
    let r = c
        .get(format!("{base}/api/analytics/pcr/NIFTY"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "circuit_open");
    // Restart-only settings are named, not applied.
    files.write(
        "gw.toml",
        &text("/api/two", "30s").replace(
            "shutdown_grace = \"2s\"",
            "shutdown_grace = \"3s\"\nport = 1",
        ),
    );
    let (status, report) = reload(&gw).await;
    assert_eq!(status, 200, "{report}");
    let named: Vec<&str> = report["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        named.contains(&"server.port") && named.contains(&"server.shutdown_grace"),
        "{report}"
    );
    // Invalid: 400 with the field errors, the running configuration stays.
    files.write("gw.toml", &text("/api/three", "10"));
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["result"], "rejected");
    assert!(
        body["errors"][0]["field"]
            .as_str()
            .unwrap()
            .starts_with("upstreams.analytics.timeout"),
        "{body}"
    );
    assert_eq!(
        c.get(format!("{base}/api/two"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/api/three"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let metrics = scrape(gw.admin_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_config_reloads_total{")
                && l.contains("result=\"success\"")),
        "{metrics}"
    );
    assert!(metrics.lines().any(
        |l| l.starts_with("gateway_config_reloads_total{") && l.contains("result=\"invalid\"")
    ));
    // The configuration in effect is 1, the one it replaced 0 (the recorder is process-wide:
    // other tests' gateways have theirs).
    let info_of = |sha: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("gateway_config_info{") && l.contains(sha))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    };
    let now_sha = sha_at(&gw).await;
    assert_ne!(now_sha, first_sha);
    assert_eq!(info_of(&now_sha).as_deref(), Some("1"), "{metrics}");
    assert_eq!(info_of(&first_sha).as_deref(), Some("0"), "{metrics}");
    let described: Value = c
        .get(format!("http://{}/admin/config", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(described["config"]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "/api/two"));
    let _ = BreakerConfig::default();
    let _ = Dur::from_secs(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_redacted_in_the_effective_configuration() {
    let up = FakeUpstream::ok().await;
    let files = Files::new();
    let text = config_text(&up.url(), None, "/api/x", "[auth]\njwt_secret = \"TOP-SECRET-VALUE\"\n[rate_limit]\nredis_url = \"redis://user:REDIS-PASSWORD@127.0.0.1:1\"\n");
    let gw = start(&files.write("gw.toml", &text)).await;
    let described = client()
        .get(format!("http://{}/admin/config", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !described.contains("TOP-SECRET-VALUE") && !described.contains("REDIS-PASSWORD"),
        "{described}"
    );
    assert!(described.contains("loaded_at"));
}
