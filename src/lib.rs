//! DeltaStream gateway: a resilience-first API gateway for the DeltaStream
//! option-market-data platform.
//!
//! A request's path through the house, one module per stage:
//!
//! * [`server`]: listeners, connection limits, header-read timeout, CORS, graceful drain.
//! * [`observability`]: the outermost layer: request id, panic -> 500, JSON access log,
//!   Prometheus metrics.
//! * [`routes`]: the route table built from [`config`] and the ONE generic proxy handler;
//!   built-ins (`/health`, `/api/docs`) and the admin listener.
//! * [`auth`]: strips client-supplied identity headers; verifies bearer tokens.
//! * [`ratelimit`]: Redis sliding-window limits shared by every replica, with an in-process
//!   fallback when Redis is down.
//! * [`upstream`]: the pooled client and the resilience pipeline around it.
//! * [`sim`]: the simulated DeltaStream backends (auth, storage, analytics) for the demo,
//!   the end-to-end tests and the chaos suite.
//! * [`demo`]: the services and the gateway in one process (`deltastream-gateway demo`).
//! * [`error`]: every error the gateway produces, mapped to a JSON response in one match.
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod observability;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod sim;
pub mod upstream;
