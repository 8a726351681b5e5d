//! DeltaStream gateway: a resilience-first API gateway for the DeltaStream
//! option-market-data platform.
//!
//! A request's path through the house, one module per stage:
//!
//! * [`server`]: listeners, connection limits, header-read and send timeouts and the minimum
//!   send rate, graceful drain; `server::check` is everything `serve` refuses a
//!   configuration for.
//! * [`observability`]: the outermost layer: request id, panic -> 500, JSON access log,
//!   Prometheus metrics (one way to keep metric handles: `metrics::with_kept`).
//! * [`routes`]: the shared state, one `RequestCtx` per request and the handler as named
//!   phases (match route -> check -> identity -> rate limit -> proxy -> respond); the route
//!   table and templates, which headers cross (`routes::headers`), the one builder of the
//!   request sent upstream for a client (`routes::outgoing`), CORS (`routes::cors`, also the
//!   WebSocket `Origin` check), response bodies held for slow clients (`routes::buffer`),
//!   compression for the client's `Accept-Encoding` on the way out (`routes::compress`)
//!   and the OpenAPI document.
//! * [`auth`]: strips client-supplied identity headers; verifies bearer tokens (remotely
//!   through the auth upstream's pipeline, or local JWTs); counts failed verifications.
//! * [`ratelimit`]: Redis sliding-window limits shared by every replica, with an in-process
//!   fallback when Redis is down.
//! * [`upstream`]: one `Pipeline` per upstream, composed in `Pipeline::new` (client share,
//!   deadline and bulkhead -> retry -> attempt record -> breaker -> balancer -> attempt
//!   timeout -> the chosen instance's pooled client), the per-call state its layers share
//!   (`upstream::call`), and the response cache in front of it (`upstream::cache`: store,
//!   single flight, stale-if-error, RFC 9111 rules, the ETag and 304s).
//! * [`websocket`]: relays an upgraded WebSocket frame-aware but unbuffered, closing both
//!   sides cleanly (1012 when the upstream goes, 1001 at shutdown or idle); the handshake and
//!   its policies are `routes::websocket`.
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
//! `scripts/check-module-cycles` (in CI) keeps it so.
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
