//! DeltaStream gateway.
pub mod config;
