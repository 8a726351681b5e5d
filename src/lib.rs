//! DeltaStream gateway.
pub mod config;
pub mod upstream;
