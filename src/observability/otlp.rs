//! OpenTelemetry span export over OTLP/HTTP (protobuf), off unless `[tracing] otlp_endpoint`
//! is set.
//!
//! Two kinds of span, in the trace that `trace.rs` continues or starts:
//! - the request (kind SERVER): the gateway's own span id, its parent the caller's span when a
//!   `traceparent` came with the request; method, route, status, error reason;
//! - each upstream attempt (kind CLIENT), a child of the request's span: upstream, instance,
//!   attempt number, outcome, status.
//!
//! Spans go into a bounded queue (`max_queue`) that a background task drains into batches of
//! at most `max_batch`, posted every `export_interval` (sooner when a batch is full) with the
//! message types of `opentelemetry-proto`. The request path never waits for the collector: a
//! full queue drops the span and counts it (`gateway_otlp_spans_dropped_total`), a failed post
//! drops its batch and logs it (`gateway_otlp_export_failures_total`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use tokio::sync::mpsc;

use crate::config::TracingConfig;

/// Who made the span, as OpenTelemetry's span kinds say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The gateway serving a request.
    Server,
    /// The gateway calling an upstream.
    Client,
}

/// An attribute value.
#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span, as the request path hands it over.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// The span ended in an error (5xx, a failed attempt).
    pub error: bool,
}

/// The queue toward the export task; dropping the last handle ends the task after a final
/// flush.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
    /// The settings it was started with (a reload with the same ones keeps it).
    settings: TracingConfig,
}

impl Exporter {
    /// Starts the export task when `cfg` names an endpoint (the caller is inside a runtime).
    pub fn start(cfg: &TracingConfig, service_name: &str) -> Option<Arc<Exporter>> {
        let endpoint = cfg.otlp_endpoint.clone()?;
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let resource = Resource {
            attributes: vec![
                attr("service.name", Value::Str(service_name.to_string())),
                attr(
                    "service.version",
                    Value::Str(env!("CARGO_PKG_VERSION").to_string()),
                ),
            ],
            ..Default::default()
        };
        tokio::spawn(run(
            rx,
            client,
            endpoint,
            resource,
            cfg.max_batch.max(1),
            cfg.export_interval.0,
        ));
        Some(Arc::new(Exporter {
            tx,
            settings: cfg.clone(),
        }))
    }

    /// The running exporter when its settings are still `cfg`'s (a reload keeps it), or a new
    /// one (or none).
    pub fn keep_or_start(
        previous: Option<&Arc<Exporter>>,
        cfg: &TracingConfig,
        service_name: &str,
    ) -> Option<Arc<Exporter>> {
        match previous {
            Some(p) if p.settings == *cfg => Some(p.clone()),
            _ => Exporter::start(cfg, service_name),
        }
    }

    /// Queues a span; never waits (a full queue drops it and counts the drop).
    pub fn record(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            metrics::counter!("gateway_otlp_spans_dropped_total").increment(1);
        }
    }
}

fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(match value {
                Value::Str(s) => any_value::Value::StringValue(s),
                Value::Int(i) => any_value::Value::IntValue(i),
            }),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn to_proto(s: SpanRecord) -> Span {
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name,
        kind: match s.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.attributes.into_iter().map(|(k, v)| attr(k, v)).collect(),
        status: Some(Status {
            code: if s.error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The body of one export: the batch under the gateway's resource and scope.
pub fn encode(resource: &Resource, batch: Vec<SpanRecord>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "deltastream-gateway".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: batch.into_iter().map(to_proto).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

async fn run(
    mut rx: mpsc::Receiver<SpanRecord>,
    client: reqwest::Client,
    endpoint: String,
    resource: Resource,
    max_batch: usize,
    interval: Duration,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = false;
    while !closed {
        tokio::select! {
            got = rx.recv() => match got {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < max_batch {
                        continue;
                    }
                }
                None => closed = true,
            },
            _ = tick.tick() => {}
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        let body = encode(&resource, std::mem::take(&mut batch));
        let sent = client
            .post(&endpoint)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("gateway_otlp_spans_exported_total").increment(n);
            }
            other => {
                let why = match other {
                    Ok(r) => format!("status {}", r.status()),
                    Err(e) => e.to_string(),
                };
                metrics::counter!("gateway_otlp_export_failures_total").increment(1);
                tracing::warn!(endpoint = %endpoint, spans = n, error = %why, "OTLP export failed; batch dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_encodes_to_an_export_request_that_decodes_back() {
        let now = SystemTime::now();
        let span = SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: Some([3; 8]),
            name: "GET /x".into(),
            kind: Kind::Server,
            start: now,
            end: now + Duration::from_millis(5),
            attributes: vec![("http.response.status_code", Value::Int(503))],
            error: true,
        };
        let bytes = encode(&Resource::default(), vec![span]);
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let s = &back.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(s.trace_id, vec![1; 16]);
        assert_eq!(s.parent_span_id, vec![3; 8]);
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 5_000_000);
        assert_eq!(
            s.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
    }
}
