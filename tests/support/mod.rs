//! Helpers shared by the integration tests: the fake upstream builder, a gateway in front of
//! fakes, raw sockets, Redis servers, a test CA, and the settings every property test uses.
//! Each area binary (`tests/<area>/main.rs`) includes this module once; its test modules reach
//! it as `crate::support`.
#![allow(dead_code, unused_imports)]
pub mod fake_upstream;
pub mod gateway;
pub mod load;
pub use fake_upstream::{refused_addr, FakeUpstream, Recorded, Step};
pub use gateway::{scrape, Trio};
pub mod process;
pub mod raw;
pub mod redis;
pub mod sim;
pub mod tls;

/// Proptest settings with `cases` cases whose failures are saved beside the test's own file
/// (`tests/edge/hostile_audit.rs` -> `tests/edge/hostile_audit.proptest-regressions`) and
/// replayed first on the next run. Proptest's default looks for the nearest `main.rs` and
/// would save them under `tests/proptest-regressions/` instead.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..proptest::test_runner::Config::with_cases(cases)
    }
}
