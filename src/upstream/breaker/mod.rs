//! The per-upstream (service) circuit breaker: fast `CircuitOpen` refusals while the upstream
//! as a whole is down, so callers stop waiting on it and it gets room to recover.
//!
//! - `state.rs`: the state machine ([`Breaker`]): closed / open / half-open, the [`Permit`]
//!   a call holds across its attempts, the snapshot `/admin` shows. Start reading here.
//! - `layer.rs`: the per-call permit slot: each attempt asks the breaker through it, and
//!   `Pipeline::send` records ONE outcome per call through it.
//! - `probe.rs`: the optional health probe (`probe_path`) that moves an open breaker to
//!   half-open as soon as an instance answers again.
//! - `tests.rs`: the breaker's behaviour on a paused clock.
//!
//! When it opens is the trip rule (`upstream/trip.rs`) and how long it stays open is the
//! doubling backoff (`upstream/backoff.rs`); instance ejection (`upstream/instances/`) uses
//! the same two, per instance and per attempt.
//!
//! # What failsafe would have done, and why it is not used
//!
//! failsafe's `StateMachine` cannot do what the gateway needs:
//! - it reads `std::time::Instant` (its mock clock is a hidden thread-local), so a paused tokio
//!   clock cannot drive the open time in tests;
//! - half-open admits every caller, we must admit at most `half_open_probes` at a time;
//! - it keeps the open deadline private, so it cannot report the time until the next probe
//!   (the `Retry-After` of a circuit-open 503 and `/admin`);
//! - its backoffs work in whole seconds and panic below one second.
//!
//! Its `success_rate_over_time_window` policy is an exponential moving average on the std
//! clock that only trips once a full window has passed since the last close, not "50% of at
//! least 20 calls in the last 10s"; its consecutive-failures policy is the one line the trip
//! rule has instead.

mod layer;
mod probe;
mod state;
#[cfg(test)]
mod tests;

pub use super::call::BreakerOpen;
pub(crate) use layer::CallPermit;
pub(crate) use probe::any_instance_healthy;
pub use probe::{http_health_check, HealthCheck};
pub use state::{Breaker, BreakerSnapshot, BreakerState, Permit};
