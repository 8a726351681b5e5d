//! The floor: the thinnest proxy the gateway's own stack (tokio + hyper) allows, for the
//! side-by-side benchmark (`loadtest/bench`, target `floor`). No routing, no pipeline, no
//! metrics, no logs: what any tokio/hyper proxy pays before it does anything of its own.
//! NOT a product: it has none of the gateway's protections.
//!
//!   floor-proxy LISTEN_ADDR BACKEND_ADDR [pooled|sticky|static]
//!
//! One current-thread runtime; each client connection is served by hyper's HTTP/1 server and
//! forwards either over hyper-util's pooled client (`pooled`, the pool reqwest also uses), or
//! over one upstream connection of its own, driven in the same task (`sticky`: no pool, no
//! channel to a connection task). `static` does not proxy at all: it answers every request
//! with the same small JSON body from memory, the floor of a cache hit.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: floor-proxy LISTEN_ADDR BACKEND_ADDR");
    let backend: String = args
        .next()
        .expect("usage: floor-proxy LISTEN_ADDR BACKEND_ADDR");
    let mode = args.next().unwrap_or_default();
    let sticky = mode == "sticky";
    let fixed = mode == "static";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build(connector);
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if fixed {
                tokio::spawn(static_connection(stream));
                continue;
            }
            if sticky {
                tokio::spawn(sticky_connection(stream, backend.clone()));
                continue;
            }
            let client = client.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let client = client.clone();
                    let uri = format!(
                        "http://{backend}{}",
                        req.uri().path_and_query().map_or("/", |p| p.as_str())
                    );
                    async move {
                        let (mut parts, body) = req.into_parts();
                        parts.uri = uri.parse().expect("uri");
                        parts.headers.remove(http::header::HOST);
                        let upstream = http::Request::from_parts(parts, body.boxed());
                        let resp = client.request(upstream).await;
                        Ok::<_, hyper_util::client::legacy::Error>(resp?.map(|b| b.boxed()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// One client connection with its own upstream connection, both driven by this task.
async fn sticky_connection(stream: tokio::net::TcpStream, backend: String) {
    let Ok(up) = tokio::net::TcpStream::connect(&backend).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, upstream_conn)) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(up)).await
    else {
        return;
    };
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let upstream = req.map(|b| b.boxed());
            let resp = sender.lock().await.send_request(upstream).await;
            Ok::<_, hyper::Error>(resp?.map(|b| b.boxed()))
        }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = server => {}
        _ = upstream_conn => {}
    }
}

const STATIC_BODY: &[u8] = br#"{"products":["AAPL","AMZN","GOOGL","META","MSFT","NFLX","NVDA","SPY","QQQ","TSLA"],"count":10,"source":"deltastream-storage","generated_at":"2024-01-01T00:00:00Z","note":"static benchmark body"}"#;

/// One client connection answered from memory (the cache-hit floor).
async fn static_connection(stream: tokio::net::TcpStream) {
    let service = hyper::service::service_fn(|_req: http::Request<Incoming>| async {
        let mut resp =
            http::Response::new(http_body_util::Full::new(Bytes::from_static(STATIC_BODY)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok::<_, std::convert::Infallible>(resp)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
