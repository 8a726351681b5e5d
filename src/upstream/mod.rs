//! Upstream calls: the pooled HTTP client and the resilience pipeline around it.
pub mod client;
pub mod pipeline;
