//! DeltaStream gateway.
