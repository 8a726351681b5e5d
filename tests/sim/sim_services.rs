//! The simulated backends over real HTTP: each test serves a service on `127.0.0.1:0`
//! in-process and talks to it with reqwest.

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::sim::{auth, Service, SimOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::sim::SimServer;

/// A service on an ephemeral port; dropping it shuts the server down.
async fn start(service: Service, opts: SimOptions) -> SimServer {
    SimServer::start(service, opts).await
}

fn options() -> SimOptions {
    SimOptions {
        faults: false,
        seed: 42,
        jwt_secret: Some("test-secret".to_owned()),
        ..SimOptions::default()
    }
}

fn with_faults() -> SimOptions {
    SimOptions {
        faults: true,
        ..options()
    }
}

/// GETs `url` and returns the status and the parsed JSON body (every response here is JSON).
async fn get(url: &str) -> (StatusCode, Value) {
    let response = reqwest::get(url).await.expect("request");
    let status = response.status();
    let body = response.json().await.expect("JSON body");
    (status, body)
}

async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

async fn post_raw(url: &str, body: &'static str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn every_service_reports_health() {
    for service in [
        Service::Auth,
        Service::Storage,
        Service::Analytics,
        Service::Socket,
    ] {
        let running = start(service, options()).await;
        let (status, body) = get(&running.url("/health")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"status": "healthy", "service": service.name()})
        );

        let (status, body) = get(&running.url("/no/such/route")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!error_of(&body).is_empty());
    }
}

#[test]
fn service_names_ports_and_parsing() {
    let expected = [
        (Service::Auth, "auth", 8001),
        (Service::Storage, "storage", 8003),
        (Service::Analytics, "analytics", 8004),
        (Service::Socket, "socket", 8002),
    ];
    for (service, name, port) in expected {
        assert_eq!(service.name(), name);
        assert_eq!(service.default_port(), port);
        assert_eq!(name.parse::<Service>().ok(), Some(service));
    }
    assert!("gateway".parse::<Service>().is_err());
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn register_login_verify_round_trip() {
    let auth = start(Service::Auth, options()).await;
    let credentials =
        json!({"email": "Ada@Example.com", "password": "correct horse", "name": "Ada"});

    let (status, registered) = post(&auth.url("/register"), credentials.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(registered["message"], "User registered successfully");
    assert_eq!(registered["user"]["email"], "ada@example.com");
    assert_eq!(registered["user"]["name"], "Ada");
    let user_id = registered["user"]["id"]
        .as_str()
        .expect("user id")
        .to_owned();

    // Emails are case-insensitive, so the same address in other case is a duplicate.
    let duplicate = json!({"email": "ADA@example.com", "password": "another one", "name": "A"});
    let (status, body) = post(&auth.url("/register"), duplicate).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(!error_of(&body).is_empty());

    let login = json!({"email": "ada@example.com", "password": "correct horse"});
    let (status, logged_in) = post(&auth.url("/login"), login).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(logged_in["message"], "Login successful");
    assert_eq!(logged_in["user"]["id"], user_id.as_str());

    for token in [&registered["token"], &logged_in["token"]] {
        let (status, verified) = post(&auth.url("/verify"), json!({"token": token})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            verified,
            json!({"valid": true, "user_id": user_id, "email": "ada@example.com"})
        );
    }

    // Wrong password and unknown email are indistinguishable to the client.
    let wrong_password = json!({"email": "ada@example.com", "password": "wrong horse"});
    let unknown_email = json!({"email": "bob@example.com", "password": "correct horse"});
    for attempt in [wrong_password, unknown_email] {
        let (status, body) = post(&auth.url("/login"), attempt).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"error": "Invalid credentials"}));
    }
}

#[tokio::test]
async fn register_rejects_bad_input_with_json_errors() {
    let auth = start(Service::Auth, options()).await;
    let cases = [
        (
            json!({"email": "not-an-email", "password": "longenough", "name": "A"}),
            "email",
        ),
        (json!({"password": "longenough", "name": "A"}), "email"),
        (
            json!({"email": "a@b.io", "password": "short", "name": "A"}),
            "Password",
        ),
        (json!({"email": "a@b.io", "name": "A"}), "Password"),
        (json!({"email": "a@b.io", "password": "longenough"}), "Name"),
        (
            json!({"email": "a@b.io", "password": "longenough", "name": "  "}),
            "Name",
        ),
        (
            json!({"email": 5, "password": "longenough", "name": "A"}),
            "JSON",
        ),
    ];
    for (body, mentions) in cases {
        let (status, error) = post(&auth.url("/register"), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error_of(&error).contains(mentions), "{body} -> {error}");
    }

    let (status, error) = post_raw(&auth.url("/register"), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&error).contains("JSON"));

    let (status, error) = post(&auth.url("/login"), json!({"email": "a@b.io"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!error_of(&error).is_empty());
}

#[tokio::test]
async fn verify_rejects_bad_tokens_and_accepts_shared_secret_tokens() {
    let auth = start(Service::Auth, options()).await;
    let day = Duration::from_secs(86_400);

    // The gateway (or a test) holding the same secret can mint tokens the service accepts.
    let token = auth::issue_token(b"test-secret", "user-7", "u7@example.com", day).expect("sign");
    let (status, body) = post(&auth.url("/verify"), json!({"token": token})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["user_id"], "user-7");

    let forged = auth::issue_token(b"other-secret", "user-7", "u7@example.com", day).expect("sign");
    for token in [forged.as_str(), "garbage", "a.b.c"] {
        let (status, body) = post(&auth.url("/verify"), json!({"token": token})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"valid": false, "error": "Invalid token"}));
    }

    let (status, body) = post(&auth.url("/verify"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!error_of(&body).is_empty());
}

// ---------------------------------------------------------------- storage

#[tokio::test]
async fn products_lists_the_three_indices() {
    let storage = start(Service::Storage, options()).await;
    let (status, body) = get(&storage.url("/products")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["count"], 3);
    let products = body["products"].as_array().expect("products array");
    let expected = [
        ("NIFTY", 75, 24_000.0),
        ("BANKNIFTY", 35, 51_000.0),
        ("FINNIFTY", 65, 23_500.0),
    ];
    for (symbol, lot, centre) in expected {
        let product = products
            .iter()
            .find(|p| p["symbol"] == symbol)
            .unwrap_or_else(|| panic!("{symbol} listed"));
        assert_eq!(product["lot_size"], lot);
        let spot = product["spot"].as_f64().expect("spot");
        assert!((spot / centre - 1.0).abs() < 0.05, "{symbol} spot {spot}");
        assert!(!product["expiries"].as_array().expect("expiries").is_empty());
    }
}

fn timestamps(body: &Value) -> Vec<chrono::DateTime<chrono::FixedOffset>> {
    body["ticks"]
        .as_array()
        .expect("ticks")
        .iter()
        .map(|tick| {
            let raw = tick["timestamp"].as_str().expect("timestamp");
            chrono::DateTime::parse_from_rfc3339(raw).expect("RFC 3339")
        })
        .collect()
}

#[tokio::test]
async fn underlying_ticks_are_newest_first_and_limited() {
    let storage = start(Service::Storage, options()).await;

    let (status, body) = get(&storage.url("/underlying/nifty?limit=5")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["product"], "NIFTY", "canonical symbol");
    assert_eq!(body["count"], 5);
    assert!(body["ticks"]
        .as_array()
        .expect("ticks")
        .iter()
        .all(|t| t["product"] == "NIFTY"));
    let times = timestamps(&body);
    assert_eq!(times.len(), 5);
    assert!(times.windows(2).all(|w| w[0] > w[1]), "newest first");

    let (_, body) = get(&storage.url("/underlying/NIFTY")).await;
    assert_eq!(body["count"], 100, "default limit");
    let (status, body) = get(&storage.url("/underlying/NIFTY?limit=5000")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["count"], 1000, "capped, not refused");

    // A ten-second window holds eleven one-second ticks.
    let (start, end) = ("2025-01-06T09:00:00Z", "2025-01-06T14:30:10%2B05:30");
    let (status, body) = get(&storage.url(&format!(
        "/underlying/BANKNIFTY?start={start}&end={end}&limit=1000"
    )))
    .await;
    assert_eq!(status, StatusCode::OK);
    let times = timestamps(&body);
    assert_eq!(times.len(), 11);
    let lower = chrono::DateTime::parse_from_rfc3339("2025-01-06T09:00:00Z").expect("time");
    assert!(times
        .iter()
        .all(|t| *t >= lower && *t <= lower + chrono::Duration::seconds(10)));
}

#[tokio::test]
async fn underlying_rejects_bad_input() {
    let storage = start(Service::Storage, options()).await;
    for query in [
        "limit=0",
        "limit=abc",
        "limit=-3",
        "start=yesterday",
        "end=2025-13-01T00:00:00Z",
    ] {
        let (status, body) = get(&storage.url(&format!("/underlying/NIFTY?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(!error_of(&body).is_empty(), "{query}");
    }
    let (status, body) = get(&storage.url("/underlying/DOGECOIN")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("DOGECOIN"));
}

#[tokio::test]
async fn option_chain_covers_every_expiry_and_filters() {
    let storage = start(Service::Storage, options()).await;
    let (status, body) = get(&storage.url("/option/chain/NIFTY")).await;
    assert_eq!(status, StatusCode::OK);
    let expiries = body["expiries"].as_array().expect("expiries").clone();
    let chain = body["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), expiries.len() * 21);
    let row = &chain[10];
    for side in ["call", "put"] {
        for field in [
            "bid",
            "ask",
            "last_price",
            "volume",
            "open_interest",
            "iv",
            "delta",
            "gamma",
            "theta",
            "vega",
        ] {
            assert!(row[side][field].is_number(), "{side}.{field} in {row}");
        }
    }

    let first = expiries[0].as_str().expect("expiry");
    let (status, body) = get(&storage.url(&format!("/option/chain/NIFTY?expiry={first}"))).await;
    assert_eq!(status, StatusCode::OK);
    let chain = body["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), 21);
    assert!(chain.iter().all(|row| row["expiry"] == first));

    let (status, _) = get(&storage.url("/option/chain/NIFTY?expiry=2031-01-02")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = get(&storage.url("/option/chain/NIFTY?expiry=soon")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("expiry"));
    let (status, _) = get(&storage.url("/option/chain/NOPE")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn same_seed_serves_byte_identical_data() {
    let a = start(Service::Storage, options()).await;
    let b = start(Service::Storage, options()).await;
    let c = start(
        Service::Storage,
        SimOptions {
            seed: 7,
            ..options()
        },
    )
    .await;
    let body = |running: &SimServer, path: &str| {
        let url = running.url(path);
        async move {
            reqwest::get(url)
                .await
                .expect("request")
                .bytes()
                .await
                .expect("body")
        }
    };
    for path in [
        "/underlying/NIFTY?limit=50",
        "/option/chain/BANKNIFTY",
        "/products",
    ] {
        assert_eq!(body(&a, path).await, body(&b, path).await, "{path}");
        assert_ne!(body(&a, path).await, body(&c, path).await, "{path}");
    }
}

// ---------------------------------------------------------------- analytics

/// Put/call open-interest ratio per expiry, recomputed from a storage chain response.
fn oi_ratio(chain: &[Value], expiry: Option<&str>) -> f64 {
    let (mut calls, mut puts) = (0u64, 0u64);
    for row in chain
        .iter()
        .filter(|row| expiry.is_none_or(|e| row["expiry"] == e))
    {
        calls += row["call"]["open_interest"].as_u64().expect("call oi");
        puts += row["put"]["open_interest"].as_u64().expect("put oi");
    }
    puts as f64 / calls as f64
}

#[tokio::test]
async fn pcr_matches_the_storage_chain_for_the_same_seed() {
    let storage = start(Service::Storage, options()).await;
    let analytics = start(Service::Analytics, options()).await;

    for product in ["NIFTY", "BANKNIFTY", "FINNIFTY"] {
        let (_, chain_body) = get(&storage.url(&format!("/option/chain/{product}"))).await;
        let chain = chain_body["chain"].as_array().expect("chain");

        let (status, pcr) = get(&analytics.url(&format!("/pcr/{product}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(pcr["product"], product);
        assert_eq!(pcr["expiry"], Value::Null);
        let overall = pcr["pcr_oi"].as_f64().expect("pcr_oi");
        assert!(
            (overall - oi_ratio(chain, None)).abs() < 1e-4,
            "{product}: {overall}"
        );

        let by_expiry = pcr["by_expiry"].as_array().expect("by_expiry");
        assert_eq!(
            by_expiry.len(),
            chain_body["expiries"].as_array().expect("expiries").len()
        );
        for entry in by_expiry {
            let expiry = entry["expiry"].as_str().expect("expiry");
            let ratio = entry["pcr_oi"].as_f64().expect("pcr_oi");
            assert!(
                (ratio - oi_ratio(chain, Some(expiry))).abs() < 1e-4,
                "{product} {expiry}"
            );
            assert!(entry["pcr_volume"].as_f64().expect("pcr_volume") > 0.0);
        }

        let expiry = by_expiry[0]["expiry"].as_str().expect("expiry");
        let (status, filtered) =
            get(&analytics.url(&format!("/pcr/{product}?expiry={expiry}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(filtered["expiry"], expiry);
        assert_eq!(filtered["pcr_oi"], by_expiry[0]["pcr_oi"]);
        assert_eq!(filtered["by_expiry"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn pcr_and_surface_reject_bad_input() {
    let analytics = start(Service::Analytics, options()).await;
    let cases = [
        ("/pcr/NOPE", StatusCode::NOT_FOUND),
        ("/pcr/NIFTY?expiry=2031-01-02", StatusCode::NOT_FOUND),
        ("/pcr/NIFTY?expiry=31/01/2025", StatusCode::BAD_REQUEST),
        ("/volatility-surface/NOPE", StatusCode::NOT_FOUND),
    ];
    for (path, expected) in cases {
        let (status, body) = get(&analytics.url(path)).await;
        assert_eq!(status, expected, "{path}");
        assert!(!error_of(&body).is_empty(), "{path}");
    }
}

#[tokio::test]
async fn volatility_surface_has_one_row_per_expiry_with_a_skew() {
    let analytics = start(Service::Analytics, options()).await;
    let (status, body) = get(&analytics.url("/volatility-surface/nifty")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["product"], "NIFTY");
    let strikes = body["strikes"].as_array().expect("strikes");
    let expiries = body["expiries"].as_array().expect("expiries");
    let rows = body["iv"].as_array().expect("iv");
    assert_eq!(rows.len(), expiries.len());
    for row in rows {
        let row = row.as_array().expect("row");
        assert_eq!(row.len(), strikes.len());
        let (low, high) = (
            row[0].as_f64().expect("iv"),
            row[row.len() - 1].as_f64().expect("iv"),
        );
        assert!(
            low > high,
            "downside strikes carry more vol: {low} vs {high}"
        );
    }
    let term = body["atm_term_structure"]
        .as_array()
        .expect("term structure");
    assert_eq!(term.len(), expiries.len());
    let days: Vec<f64> = term
        .iter()
        .map(|t| t["days_to_expiry"].as_f64().expect("days"))
        .collect();
    assert!(days.windows(2).all(|w| w[0] < w[1]));
    assert!(term
        .iter()
        .all(|t| t["atm_iv"].as_f64().is_some_and(|iv| iv > 0.05 && iv < 0.5)));
}

// ---------------------------------------------------------------- faults

async fn set_faults(running: &SimServer, settings: Value) -> (StatusCode, Value) {
    post(&running.url("/_faults"), settings).await
}

async fn clear_faults(running: &SimServer) {
    let response = reqwest::Client::new()
        .delete(running.url("/_faults"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn fault_switch_is_absent_without_the_flag() {
    let storage = start(Service::Storage, options()).await;
    let (status, _) = get(&storage.url("/_faults")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = set_faults(&storage, json!({"error_rate": 1.0})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(&storage.url("/products")).await;
    assert_eq!(status, StatusCode::OK);
}

/// GET /_faults split into the setting and the capacity fault's `state`.
async fn shown_faults(running: &SimServer) -> (Value, Value) {
    let (status, mut body) = get(&running.url("/_faults")).await;
    assert_eq!(status, StatusCode::OK);
    let state = body
        .as_object_mut()
        .and_then(|fields| fields.remove("state"))
        .expect("GET /_faults has a state");
    (body, state)
}

#[tokio::test]
async fn fault_settings_are_validated_shown_and_cleared() {
    let storage = start(Service::Storage, with_faults()).await;
    let defaults = json!({"latency_ms": 0, "jitter_ms": 0, "error_rate": 0.0, "error_status": 503,
                          "hang": false, "workers": 0, "backlog": null});
    let idle = json!({"busy": 0, "queued": 0, "served": 0, "refused": 0});
    assert_eq!(
        shown_faults(&storage).await,
        (defaults.clone(), idle.clone())
    );

    for bad in [
        json!({"error_rate": 1.5}),
        json!({"error_rate": -0.1}),
        json!({"error_status": 200}),
        json!({"error_status": 600}),
        json!({"latency": 100}),
        json!({"latency_ms": -1}),
        json!({"workers": -1}),
        json!({"workers": 100_001}),
        json!({"backlog": 10}),
        json!({"workers": 4, "backlog": 1_000_001}),
        json!({"state": {"busy": 0}}),
    ] {
        let (status, body) = set_faults(&storage, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(!error_of(&body).is_empty(), "{bad}");
    }
    assert_eq!(
        shown_faults(&storage).await.0,
        defaults,
        "a rejected POST changes nothing"
    );

    let (status, active) = set_faults(
        &storage,
        json!({"latency_ms": 5, "error_rate": 0.25, "workers": 16, "backlog": 100}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let expected = json!({"latency_ms": 5, "jitter_ms": 0, "error_rate": 0.25, "error_status": 503,
                          "hang": false, "workers": 16, "backlog": 100});
    assert_eq!(active, expected);
    assert_eq!(shown_faults(&storage).await, (expected, idle.clone()));

    clear_faults(&storage).await;
    assert_eq!(shown_faults(&storage).await, (defaults, idle));
}

/// Polls GET /_faults until its `state` satisfies `ready` (every 5 ms, 10 s at most).
async fn wait_for_state(running: &SimServer, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = shown_faults(running).await;
        if ready(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "never reached: {what}; last {state}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count(state: &Value, field: &str) -> u64 {
    state[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {state}"))
}

#[tokio::test]
async fn capacity_fault_serves_two_at_a_time_in_three_waves() {
    let storage = start(Service::Storage, with_faults()).await;
    let (status, _) = set_faults(&storage, json!({"workers": 2, "latency_ms": 200})).await;
    assert_eq!(status, StatusCode::OK);

    let client = reqwest::Client::new();
    let started = Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let request = client.get(storage.url("/products")).send();
            tokio::spawn(async move {
                let status = request.await.expect("response").status();
                (status, started.elapsed())
            })
        })
        .collect();

    // Watch the counters while the waves run: never more than 2 in service.
    let mut most_busy = 0;
    let mut most_queued = 0;
    loop {
        let (_, state) = shown_faults(&storage).await;
        most_busy = most_busy.max(count(&state, "busy"));
        most_queued = most_queued.max(count(&state, "queued"));
        assert!(count(&state, "busy") <= 2, "{state}");
        if count(&state, "served") == 6 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{state}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most_busy, 2, "both workers were used");
    assert!(most_queued >= 1, "the rest waited in the backlog");

    let mut finished = Vec::new();
    for request in requests {
        let (status, elapsed) = request.await.expect("task");
        assert_eq!(status, StatusCode::OK);
        finished.push(elapsed);
    }
    finished.sort();
    // Service time is spent holding a worker: the k-th answer cannot come before wave
    // k / 2 + 1 has ended (a lower bound only: a busy machine can make waves later, never
    // earlier).
    for (k, elapsed) in finished.iter().enumerate() {
        let wave = k as u64 / 2 + 1;
        assert!(
            *elapsed >= Duration::from_millis(200 * wave),
            "answer {k} after {elapsed:?}: all {finished:?}"
        );
    }
    let (_, state) = shown_faults(&storage).await;
    assert_eq!(
        state,
        json!({"busy": 0, "queued": 0, "served": 6, "refused": 0})
    );
}

#[tokio::test]
async fn capacity_fault_backlog_is_fifo_bounded_and_never_holds_health_or_the_switch() {
    let storage = start(Service::Storage, with_faults()).await;
    let client = reqwest::Client::new();
    // The first request draws a 2 s service time; the setting is then shortened to 200 ms
    // for those behind it, which get it when their turn comes. That leaves 2 s to line the
    // others up, whatever the machine's load.
    set_faults(
        &storage,
        json!({"workers": 1, "backlog": 2, "latency_ms": 2000}),
    )
    .await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |name: &'static str| {
        let request = client.get(storage.url("/products")).send();
        let order = order.clone();
        tokio::spawn(async move {
            let status = request.await.expect("response").status();
            order.lock().expect("order").push(name);
            status
        })
    };
    let first = send("first");
    wait_for_state(&storage, "first holds the worker", |s| {
        count(s, "busy") == 1
    })
    .await;
    set_faults(
        &storage,
        json!({"workers": 1, "backlog": 2, "latency_ms": 200}),
    )
    .await;
    let second = send("second");
    wait_for_state(&storage, "second waits", |s| count(s, "queued") == 1).await;
    let third = send("third");
    wait_for_state(&storage, "third waits", |s| count(s, "queued") == 2).await;

    // The backlog is full: refused at once, with the JSON error body.
    let (status, body) = get(&storage.url("/products")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, json!({"error": "backlog full"}));

    // Health and the switch are not behind the workers: they answer while all are taken.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .build()
        .expect("client");
    for path in ["/health", "/_faults"] {
        let response = quick.get(storage.url(path)).send().await.expect(path);
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let (_, state) = shown_faults(&storage).await;
    assert_eq!(
        (
            count(&state, "busy"),
            count(&state, "queued"),
            count(&state, "refused")
        ),
        (1, 2, 1),
        "{state}"
    );

    for request in [first, second, third] {
        assert_eq!(request.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(*order.lock().expect("order"), ["first", "second", "third"]);
    let (_, state) = shown_faults(&storage).await;
    assert_eq!(
        state,
        json!({"busy": 0, "queued": 0, "served": 3, "refused": 1})
    );
}

#[tokio::test]
async fn capacity_fault_serves_abandoned_requests_and_clearing_releases_the_backlog() {
    let storage = start(Service::Storage, with_faults()).await;
    set_faults(&storage, json!({"workers": 1, "latency_ms": 2000})).await;

    // A client that gives up does not free the worker: its request is still served, as one
    // already in gunicorn's backlog is.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let error = impatient
        .get(storage.url("/products"))
        .send()
        .await
        .expect_err("2 s of service time");
    assert!(error.is_timeout(), "{error}");
    let (_, state) = shown_faults(&storage).await;
    assert_eq!(
        count(&state, "busy"),
        1,
        "the abandoned request holds its worker: {state}"
    );

    let waiting = tokio::spawn(reqwest::get(storage.url("/products")));
    wait_for_state(&storage, "a patient request waits", |s| {
        count(s, "queued") == 1
    })
    .await;
    // Clearing the fault lifts the worker limit: the waiting request is served at once (with
    // the latency now in force, none), long before the abandoned one's 2 s are up.
    clear_faults(&storage).await;
    let released = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("released by DELETE")
        .expect("task")
        .expect("response");
    assert_eq!(released.status(), StatusCode::OK);
    let (_, state) = shown_faults(&storage).await;
    assert_eq!(
        (count(&state, "busy"), count(&state, "served")),
        (1, 1),
        "only the abandoned request is still in service: {state}"
    );
    wait_for_state(&storage, "the abandoned request served", |s| {
        count(s, "busy") == 0 && count(s, "served") == 2
    })
    .await;
}

#[tokio::test]
async fn latency_fault_slows_requests_but_not_health() {
    let analytics = start(Service::Analytics, with_faults()).await;
    set_faults(&analytics, json!({"latency_ms": 300, "jitter_ms": 20})).await;

    let started = Instant::now();
    let (status, _) = get(&analytics.url("/pcr/NIFTY")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    // Health and the switch itself are exempt, so they answer while the API is slowed.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(250))
        .build()
        .expect("client");
    for path in ["/health", "/_faults"] {
        let response = client.get(analytics.url(path)).send().await.expect(path);
        assert_eq!(response.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn error_fault_answers_the_configured_status() {
    let auth = start(Service::Auth, with_faults()).await;
    set_faults(&auth, json!({"error_rate": 1.0, "error_status": 502})).await;
    let (status, body) = post(&auth.url("/verify"), json!({"token": "x"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, json!({"error": "injected fault"}));

    clear_faults(&auth).await;
    let (status, _) = post(&auth.url("/verify"), json!({"token": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn hang_fault_times_clients_out_until_cleared() {
    let storage = start(Service::Storage, with_faults()).await;
    set_faults(&storage, json!({"hang": true})).await;

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let error = impatient
        .get(storage.url("/products"))
        .send()
        .await
        .expect_err("a hung request must not answer");
    assert!(error.is_timeout(), "{error}");

    // A patient client parked by the hang is released when the fault is cleared.
    let parked = tokio::spawn(reqwest::get(storage.url("/products")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!parked.is_finished());
    clear_faults(&storage).await;
    let released = tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .expect("released after DELETE")
        .expect("task")
        .expect("response");
    assert_eq!(released.status(), StatusCode::OK);

    let (status, _) = get(&storage.url("/products")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_completes_while_requests_are_hung() {
    let SimServer {
        addr, stop, server, ..
    } = SimServer::start(Service::Storage, with_faults()).await;
    let base = format!("http://{addr}");

    reqwest::Client::new()
        .post(format!("{base}/_faults"))
        .json(&json!({"hang": true}))
        .send()
        .await
        .expect("set hang");
    let parked = tokio::spawn(reqwest::get(format!("{base}/products")));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("graceful shutdown is not blocked by hung requests")
        .expect("task");
    assert!(result.is_ok());
    let _ = parked.await;
}
