//! Simulated DeltaStream backends: the services the gateway fronts, small enough to run
//! in-process in tests and in a container for the demo and the chaos experiments.

pub mod black_scholes;
pub mod market;
