//! DeltaStream gateway.
pub mod config;
pub mod ratelimit;
