//! Helpers shared by the integration tests: the fake upstream builder and spawn helpers.
#![allow(dead_code, unused_imports)]
pub mod fake_upstream;
pub mod gateway;
pub use fake_upstream::{refused_addr, FakeUpstream, Recorded, Step};
pub mod raw;
pub mod redis;
pub mod tls;
