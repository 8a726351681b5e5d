//! Configuration: raw serde types, defaults, validation and environment overrides.
pub mod types;
pub use types::{join, ByteSize, Dur, FieldError};
