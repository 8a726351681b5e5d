//! The balancer: which instance of an upstream takes each attempt, and sending it there.
//! Laid out as tower's `balance/p2c` and `load/peak_ewma`: the choice, and the load it
//! compares, each in its own file.
//!
//! - `layer.rs`: the [`Balancer`]'s part of an attempt: picks, moves the request to the
//!   instance, sends it on the instance's pooled client, reports the attempt's outcome to
//!   the instance's load and health. Start reading here.
//! - `p2c.rs`: the choice among the instances that may serve: untried ones first (a retry or
//!   a hedge goes elsewhere), then power of two choices by peak-EWMA cost, or round robin.
//! - `peak_ewma.rs`: each instance's load: peak-EWMA latency x calls in flight.
//!
//! Which instances may serve (membership, ejection, the pass-over after a failure) is the
//! instance set's (`upstream/instances/`).

mod layer;
mod p2c;
mod peak_ewma;

pub(crate) use layer::{Abandoned, Balancer};
#[cfg(test)]
pub(crate) use p2c::Picker;
pub(crate) use peak_ewma::PeakEwma;
