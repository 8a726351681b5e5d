//! Upstream calls: the pooled HTTP client, the resilience pipeline around it, and the
//! response cache in front of it.
pub mod cache;
pub mod client;
pub mod pipeline;
