//! Rate limiting against real `redis-server` processes that each test starts on free ports
//! (standalone and a 3-node cluster), alone and through real gateways. Run one file's tests
//! with `cargo test --test ratelimit ratelimit_redis::`.

#[path = "../support/mod.rs"]
mod support;

mod fleet;
mod ratelimit_gateway;
mod ratelimit_redis;
