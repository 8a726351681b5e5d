//! OpenTelemetry export: with `[tracing] otlp_endpoint`, every request's span and each of its
//! upstream attempts reach an OTLP/HTTP receiver (a real HTTP server here, decoding the
//! protobuf with opentelemetry-proto), in the trace the client's `traceparent` named.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::{FakeUpstream, Step};

#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<Vec<String>>>,
}

async fn export(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-protobuf") {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    for rs in request.resource_spans {
        for kv in rs.resource.map(|r| r.attributes).unwrap_or_default() {
            if kv.key == "service.name" {
                if let Some(Value::StringValue(s)) = kv.value.and_then(|v| v.value) {
                    r.service_names.lock().unwrap().push(s);
                }
            }
        }
        for ss in rs.scope_spans {
            r.spans.lock().unwrap().extend(ss.spans);
        }
    }
    StatusCode::OK
}

/// A local OTLP/HTTP receiver: its traces URL and what it received.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1/traces"), received)
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

fn int_attr(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

/// The spans of `trace_id` once `n` have arrived (bounded wait).
async fn spans_of(received: &Received, trace_id: &[u8], n: usize) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans: Vec<Span> = received
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if spans.len() >= n || Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_each_of_its_attempts_are_exported_in_the_clients_trace() {
    let (endpoint, received) = receiver().await;
    // The first attempt gets a 503 and is retried: two attempt spans.
    let up = FakeUpstream::builder()
        .steps([Step::status(503)])
        .then(Step::status(200))
        .start()
        .await;
    let url = up.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    cfg.service_name = "otlp-test".into();
    cfg.tracing.otlp_endpoint = Some(endpoint);
    cfg.tracing.export_interval = deltastream_gateway::config::Dur::from_millis(100);
    let gw = spawn(cfg).await;
    let c = client();
    let trace_hex = "0af7651916cd43dd8448eb211c80319c";
    let r = c
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("traceparent", format!("00-{trace_hex}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream-attempts"], "2");
    r.bytes().await.unwrap();

    let trace_id = hex::decode(trace_hex).unwrap();
    let spans = spans_of(&received, &trace_id, 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    let server = server[0];
    assert_eq!(
        server.parent_span_id,
        hex::decode("b7ad6b7169203331").unwrap()
    );
    assert_eq!(server.name, "GET /api/data/underlying/{product}");
    assert_eq!(
        str_attr(server, "http.route"),
        "/api/data/underlying/{product}"
    );
    assert_eq!(int_attr(server, "http.response.status_code"), 200);
    assert_eq!(str_attr(server, "upstream"), "storage");
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano);

    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| int_attr(s, "gateway.attempt"));
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a.parent_span_id, server.span_id,
            "attempts are children of the request"
        );
        assert_eq!(str_attr(a, "upstream"), "storage");
        assert_eq!(str_attr(a, "server.address"), up.addr.to_string());
        assert_eq!(int_attr(a, "gateway.attempt"), i as i64 + 1);
        assert!(a.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(a.end_time_unix_nano <= server.end_time_unix_nano);
    }
    assert_eq!(int_attr(attempts[0], "http.response.status_code"), 503);
    assert_eq!(str_attr(attempts[0], "gateway.outcome"), "status_5xx");
    assert_eq!(int_attr(attempts[1], "http.response.status_code"), 200);

    // The upstream saw the same trace, with the gateway's span as its parent.
    let seen = up.last_request().unwrap();
    let tp = seen.headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(
        tp,
        format!("00-{trace_hex}-{}-01", hex::encode(&server.span_id))
    );
    assert!(received
        .service_names
        .lock()
        .unwrap()
        .iter()
        .all(|s| s == "otlp-test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_traceparent_a_new_trace_starts_and_a_dead_collector_costs_the_client_nothing() {
    let (endpoint, received) = receiver().await;
    let up = FakeUpstream::ok().await;
    let url = up.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    cfg.tracing.otlp_endpoint = Some(endpoint);
    cfg.tracing.export_interval = deltastream_gateway::config::Dur::from_millis(100);
    let gw = spawn(cfg).await;
    let c = client();
    let r = c
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let tp = up.last_request().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let trace_id = hex::decode(&tp[3..35]).unwrap();
    let spans = spans_of(&received, &trace_id, 2).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("the request's span");
    assert!(
        server.parent_span_id.is_empty(),
        "a new trace has no parent"
    );

    // A collector that refuses connections: requests are answered as before.
    let (dead_endpoint, _) = (
        format!("http://{}/v1/traces", support::refused_addr().await),
        (),
    );
    let mut cfg = config_with_upstreams({
        let url = up.url();
        move |_| url.clone()
    });
    cfg.tracing.otlp_endpoint = Some(dead_endpoint);
    cfg.tracing.export_interval = deltastream_gateway::config::Dur::from_millis(50);
    let gw = spawn(cfg).await;
    for _ in 0..50 {
        let started = Instant::now();
        let r = c
            .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The failures are counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(gw.admin_addr).await;
        let failures = metrics
            .lines()
            .find(|l| l.starts_with("gateway_otlp_export_failures_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if failures >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
