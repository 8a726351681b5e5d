//! DeltaStream gateway.

pub mod sim;
