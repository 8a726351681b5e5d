//! DeltaStream gateway: a resilience-first API gateway for the DeltaStream
//! option-market-data platform. One binary (`src/main.rs`: `serve`, `demo`, `sim`,
//! `check-config`, `probe`) on this library.
//!
//! Where to start reading: [`server::start_with_source`] builds everything from a
//! [`config::Config`] and opens the listeners; [`routes::handle`] is one request's path as
//! named phases; [`upstream::Pipeline::new`] composes every call to a backend; and
//! `error::GatewayError::render` is every answer the gateway makes up itself.
//!
//! A request's path through the house, one module per stage, outside in:
//!
//! * [`server`]: the listeners (public, optionally TLS; the http->https redirect; the admin
//!   listener, `server::admin`, with readiness, `/metrics` and operator actions), one accept
//!   loop with the connection guards (caps, header-read, idle and send timeouts, the minimum
//!   send rate), graceful drain, and the live configuration a reload swaps
//!   (`server::reload`); `server::check` is everything `serve` refuses a configuration for.
//! * [`observability`]: the outermost layer (request id, panic -> 500, one JSON access-log
//!   line, request metrics), JSON logging, the Prometheus recorder and metric catalog, W3C
//!   trace context, the optional OTLP span export and the runtime's scheduling delay
//!   (`observability::lag`).
//! * [`routes`]: the shared state, one `RequestCtx` per request and the handler as named
//!   phases (match route -> admit -> check -> identity -> rate limit -> proxy -> respond); the
//!   route table and templates, which headers cross (`routes::headers`), the one builder of
//!   the request sent upstream for a client (`routes::outgoing`), CORS (`routes::cors`, also
//!   the WebSocket `Origin` check), response bodies held for slow clients (`routes::buffer`),
//!   compression for the client's `Accept-Encoding` on the way out
//!   (`routes::compress`), the OpenAPI document (`routes::docs`) and the WebSocket handshake (`routes::websocket`);
//!   `routes::admission` refuses new requests while the gateway itself is saturated (its
//!   runtime late, or too many in flight for its memory).
//! * [`auth`]: strips client-supplied identity headers; verifies bearer tokens (remotely
//!   through the auth upstream's pipeline, or local JWTs); counts failed verifications
//!   (`auth::guard`).
//! * [`ratelimit`]: Redis sliding-window limits shared by every replica, with an in-process
//!   fallback when Redis is down.
//! * [`upstream`]: one `Pipeline` per upstream, composed in `Pipeline::new` (client share,
//!   the concurrency limit learnt from latency with its short wait (`upstream::concurrency`),
//!   deadline and bulkhead -> retry -> attempt record -> breaker -> balancer -> attempt
//!   timeout -> the chosen instance's pooled client), the instances behind each upstream and
//!   their discovery, the per-call state its layers share (`upstream::call`), and the
//!   response cache in front of it (`upstream::cache`: store, single flight, stale-if-error,
//!   RFC 9111 rules, the ETag and 304s).
//! * [`websocket`]: relays an upgraded WebSocket frame-aware but unbuffered, closing both
//!   sides cleanly (1012 when the upstream goes, or goes silent: pinged, no answer; 1001 at
//!   shutdown or idle); the handshake and its policies are `routes::websocket`.
//!
//! Beside the path:
//!
//! * [`client`]: [`client::ClientKey`], who a request is counted against (an IPv4 address or
//!   an IPv6 prefix, /64 by default): the one key of every per-client policy, resolved once
//!   per request from the peer or a trusted proxy's forwarding headers.
//! * [`config`]: the ground floor: every settings type with its defaults and validation
//!   (errors name the field), the embedded DeltaStream route table (with `config::responses`:
//!   what each route's service answers, for the OpenAPI document; `config::schema` reads and
//!   checks response schemas), env overrides, and what of it may be shown (`config::redact`:
//!   secrets masked, the fingerprint). It imports nothing from the modules above.
//! * [`error`]: every error the gateway produces, mapped to a JSON response in one match.
//! * [`sim`]: the simulated DeltaStream backends for the demo, the end-to-end tests and the
//!   chaos suite.
//! * [`demo`]: the services and the gateway in one process (`deltastream-gateway demo`).
//!
//! Dependencies point one way: server -> routes -> auth -> {ratelimit, upstream} ->
//! observability -> error, and every module -> config and client;
//! `scripts/check-module-cycles` (in CI) keeps it so, and `scripts/check-module-tours` keeps
//! every module's tour naming all of its submodules.
pub mod auth;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod observability;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod sim;
pub mod upstream;
pub mod websocket;
