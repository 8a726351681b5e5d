//! The storage service: products, underlying ticks and option chains from the seeded market.
//!
//! All data is a function of the seed, anchored to the frozen [`market::REFERENCE_TIME`]
//! (2025-01-06T10:00:00Z) rather than the wall clock (see [`market`]). Products are matched
//! case-insensitively; responses carry the canonical symbol. Shapes (abbreviated):
//!
//! ```text
//! GET /products
//!   {"count":3,"products":[{"symbol":"NIFTY","lot_size":75,"spot":24428.15,"tick_size":0.05,
//!     "strike_step":50.0,"expiries":["2025-01-09",...]},...]}
//! GET /underlying/{product}?limit=100&start=<RFC 3339>&end=<RFC 3339>
//!   {"product":"NIFTY","count":2,"ticks":[{"product":"NIFTY","price":24428.15,
//!     "timestamp":"2025-01-06T10:00:00Z"},...]}                      newest first
//!   limit: default 100, above 1000 capped to 1000, 0 or not a number -> 400;
//!   start/end: inclusive bounds, malformed or start > end -> 400; unknown product -> 404.
//! GET /option/chain/{product}?expiry=YYYY-MM-DD
//!   {"product":"NIFTY","spot":24428.15,"timestamp":"2025-01-06T10:00:00Z",
//!    "risk_free_rate":0.065,"expiries":[...all listed...],
//!    "chain":[{"expiry":"2025-01-09","strike":24450.0,
//!      "call":{"bid":135.2,"ask":135.85,"last_price":135.3,"volume":32680,
//!              "open_interest":85624,"iv":0.1583,"delta":0.4929,"gamma":0.001138,
//!              "theta":-25.4237,"vega":8.8338},
//!      "put":{...}},...]}                               ordered by expiry, then strike
//!   21 strikes (ATM +/- 10 steps) per expiry; theta per calendar day, vega per 1 % vol.
//!   expiry: absent/empty = all; not a date -> 400; a date that is not listed -> 404.
//! ```

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::DateTime;
use serde::Deserialize;
use serde_json::{json, Value};

use super::market::{self, Market};
use super::{date_strings, expiry_filter, product_or_404, query_error, ApiError, ExpiryQuery};

const DEFAULT_TICK_LIMIT: usize = 100;
/// Larger requests are capped rather than refused: a client asking for "everything" still gets
/// a useful answer, just not an unbounded one.
const MAX_TICK_LIMIT: usize = 1000;

pub fn router(market: Arc<Market>) -> Router {
    Router::new()
        .route("/products", get(products))
        .route("/underlying/{product}", get(underlying))
        .route("/option/chain/{product}", get(option_chain))
        .with_state(market)
}

async fn products(State(market): State<Arc<Market>>) -> Json<Value> {
    let products: Vec<Value> = market::PRODUCTS
        .iter()
        .map(|spec| {
            json!({
                "symbol": spec.symbol,
                "lot_size": spec.lot_size,
                "spot": market.spot(spec),
                "tick_size": spec.tick_size,
                "strike_step": spec.strike_step,
                "expiries": date_strings(&market.expiries(spec)),
            })
        })
        .collect();
    Json(json!({"count": products.len(), "products": products}))
}

/// Raw strings so each bad value gets a message naming the parameter, not a serde error.
#[derive(Deserialize)]
struct UnderlyingQuery {
    limit: Option<String>,
    start: Option<String>,
    end: Option<String>,
}

async fn underlying(
    State(market): State<Arc<Market>>,
    Path(product): Path<String>,
    query: Result<Query<UnderlyingQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let spec = product_or_404(&product)?;
    let limit = parse_limit(query.limit.as_deref())?;
    let start = parse_time("start", query.start.as_deref())?;
    let end = parse_time("end", query.end.as_deref())?;
    if let (Some(start), Some(end)) = (start, end) {
        if start > end {
            return Err(ApiError::bad_request("start must not be after end"));
        }
    }

    let ticks: Vec<Value> = market
        .ticks(spec)
        .iter()
        .rev()
        .filter(|tick| start.is_none_or(|start| tick.timestamp >= start))
        .filter(|tick| end.is_none_or(|end| tick.timestamp <= end))
        .take(limit)
        .map(|tick| {
            json!({
                "product": spec.symbol,
                "price": tick.price,
                "timestamp": tick.timestamp_rfc3339(),
            })
        })
        .collect();
    Ok(Json(json!({
        "product": spec.symbol,
        "count": ticks.len(),
        "ticks": ticks,
    })))
}

async fn option_chain(
    State(market): State<Arc<Market>>,
    Path(product): Path<String>,
    query: Result<Query<ExpiryQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let spec = product_or_404(&product)?;
    let expiry = expiry_filter(&market, spec, query.expiry.as_deref())?;
    Ok(Json(json!({
        "product": spec.symbol,
        "spot": market.spot(spec),
        "timestamp": market::rfc3339(market::REFERENCE_TIME),
        "risk_free_rate": market::RISK_FREE_RATE,
        "expiries": date_strings(&market.expiries(spec)),
        "chain": market.chain(spec, expiry),
    })))
}

fn parse_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_TICK_LIMIT);
    };
    match raw.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(ApiError::bad_request(format!(
            "limit must be a positive integer, got {raw:?}"
        ))),
        Ok(limit) => Ok(limit.min(MAX_TICK_LIMIT)),
    }
}

/// Parses an RFC 3339 bound into unix seconds.
fn parse_time(name: &str, raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|raw| {
        DateTime::parse_from_rfc3339(raw.trim())
            .map(|moment| moment.timestamp())
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "{name} must be an RFC 3339 timestamp like 2025-01-06T09:00:00Z, got {raw:?}"
                ))
            })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_parsing() {
        assert_eq!(parse_limit(None).ok(), Some(DEFAULT_TICK_LIMIT));
        assert_eq!(parse_limit(Some("5")).ok(), Some(5));
        assert_eq!(parse_limit(Some("5000")).ok(), Some(MAX_TICK_LIMIT));
        for bad in ["0", "-1", "abc", "", "1.5"] {
            assert!(
                parse_limit(Some(bad)).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
