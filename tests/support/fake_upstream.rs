//! An in-process fake upstream on 127.0.0.1:0 that answers from a script of steps and records
//! every request it receives, so tests can assert both what the client saw and what the
//! upstream saw (hit counts, paths, headers, bodies).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the fake does with one request.
#[derive(Clone, Debug)]
pub enum Step {
    /// Answer with this status, extra headers and body.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// Wait, then perform the inner step.
    Delay(Duration, Box<Step>),
    /// Never answer (until the client gives up).
    Hang,
    /// Close the connection without any response (a reset before a response).
    Reset,
}

impl Step {
    pub fn status(status: u16) -> Step {
        Step::Respond {
            status,
            headers: Vec::new(),
            body: Bytes::from(format!("{{\"status\":{status}}}")),
        }
    }
    pub fn body(status: u16, content_type: &str, body: impl Into<Bytes>) -> Step {
        Step::Respond {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
        }
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Step {
        if let Step::Respond { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
    pub fn delayed(self, d: Duration) -> Step {
        Step::Delay(d, Box::new(self))
    }
}

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as they arrived on the wire.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
pub struct FakeUpstreamBuilder {
    script: VecDeque<Step>,
    fallback: Option<Step>,
}

impl FakeUpstreamBuilder {
    /// Steps used in order, one per request; after they run out, `then` (default: 200).
    pub fn steps(mut self, steps: impl IntoIterator<Item = Step>) -> Self {
        self.script.extend(steps);
        self
    }
    /// Statuses used in order, one per request.
    pub fn statuses(self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.steps(statuses.into_iter().map(Step::status))
    }
    /// What every request gets once the scripted steps are used up.
    pub fn then(mut self, step: Step) -> Self {
        self.fallback = Some(step);
        self
    }
    pub async fn start(self) -> FakeUpstream {
        self.start_on("127.0.0.1:0".parse().expect("addr")).await
    }
    /// Like `start`, on a given address (e.g. 127.0.0.2 with another fake's port, so that
    /// one host name can resolve to several instances on the same port).
    pub async fn start_on(self, at: SocketAddr) -> FakeUpstream {
        let listener = TcpListener::bind(at).await.expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream addr");
        let state = Arc::new(Shared {
            script: Mutex::new(self.script),
            fallback: self.fallback.unwrap_or_else(|| Step::status(200)),
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            recorded: Mutex::new(Vec::new()),
        });
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn_state = accept_state.clone();
                conn_state.connections.fetch_add(1, Ordering::SeqCst);
                conn_state.open_connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc_state = conn_state.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let st = svc_state.clone();
                        async move { st.handle(req).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    conn_state.open_connections.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FakeUpstream { addr, state, task }
    }
}

struct Shared {
    script: Mutex<VecDeque<Step>>,
    fallback: Step,
    hits: AtomicUsize,
    connections: AtomicUsize,
    open_connections: AtomicUsize,
    recorded: Mutex<Vec<Recorded>>,
}

#[derive(Debug)]
struct ResetConnection;
impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted reset")
    }
}
impl std::error::Error for ResetConnection {}

impl Shared {
    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ResetConnection> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.recorded.lock().unwrap().push(Recorded {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body,
        });
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.fallback.clone());
        run_step(step).await
    }
}

async fn run_step(mut step: Step) -> Result<Response<Full<Bytes>>, ResetConnection> {
    loop {
        match step {
            Step::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                step = *inner;
            }
            Step::Hang => {
                std::future::pending::<()>().await;
            }
            Step::Reset => return Err(ResetConnection),
            Step::Respond {
                status,
                headers,
                body,
            } => {
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
                for (k, v) in headers {
                    resp.headers_mut().append(
                        HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                        HeaderValue::from_str(&v).expect("header value"),
                    );
                }
                return Ok(resp);
            }
        }
    }
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub fn builder() -> FakeUpstreamBuilder {
        FakeUpstreamBuilder::default()
    }
    /// An upstream that answers 200 with a small JSON body to everything.
    pub async fn ok() -> FakeUpstream {
        Self::builder().start().await
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Requests received so far (including ones still being answered).
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
    /// TCP connections currently open.
    pub fn open_connections(&self) -> usize {
        self.state.open_connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }
    pub fn last_request(&self) -> Option<Recorded> {
        self.state.recorded.lock().unwrap().last().cloned()
    }
    /// Replace what the fake answers from now on.
    pub fn set_steps(&self, steps: impl IntoIterator<Item = Step>) {
        let mut s = self.state.script.lock().unwrap();
        s.clear();
        s.extend(steps);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A 127.0.0.1 address on which nothing listens: connecting is refused at once.
pub async fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

#[allow(unused)]
fn _assert_infallible(_: Infallible) {}
