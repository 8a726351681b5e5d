//! Response cache for GET/HEAD routes that opt in (`cache = { ttl = "5s" }`).
//!
//! This first part holds the pieces with no runtime state: configuration, the cache key and
//! the RFC 9111 storability rules.

mod config;
mod key;
mod rules;

pub use config::{CacheConfig, RouteCachePolicy};
pub use key::CacheKey;
pub use rules::request_is_cacheable;
