//! The analytics service: put-call ratio and implied-volatility surface.
//!
//! `GET /pcr/{product}?expiry=`, `GET /volatility-surface/{product}`. Both are computed from
//! the same seeded [`Market`] the storage service serves, in-process: the analytics service
//! does not need storage running, and its numbers agree with storage's chain for the same seed.
//!
//! ```text
//! GET /pcr/{product}?expiry=YYYY-MM-DD
//!   {"product":"NIFTY","expiry":null,"timestamp":"2025-01-06T10:00:00Z",
//!    "pcr_oi":1.0291,"pcr_volume":1.1507,"total_call_oi":4568320,"total_put_oi":4701452,
//!    "total_call_volume":1633763,"total_put_volume":1880023,
//!    "by_expiry":[{"expiry":"2025-01-09","pcr_oi":1.0731,"pcr_volume":1.1641,
//!                  "total_call_oi":...,"total_put_oi":...,...},...]}
//!   Ratios are put / call, 4 decimals, `null` if the call side is zero. `expiry` as in storage.
//! GET /volatility-surface/{product}
//!   {"product":"BANKNIFTY","spot":50414.5,"timestamp":"...","strikes":[49400.0,...],
//!    "expiries":["2025-01-30",...],"iv":[[0.1801,...],...],        one row per expiry
//!    "atm_term_structure":[{"expiry":"2025-01-30","days_to_expiry":24.0,"atm_iv":0.167},...]}
//! ```

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use super::market::{self, ChainRow, Market};
use super::{date_strings, expiry_filter, product_or_404, query_error, ApiError, ExpiryQuery};

pub fn router(market: Arc<Market>) -> Router {
    Router::new()
        .route("/pcr/{product}", get(pcr))
        .route("/volatility-surface/{product}", get(volatility_surface))
        .with_state(market)
}

/// Open-interest and volume totals for a set of chain rows, and the ratios derived from them.
#[derive(Debug, Default, Serialize)]
struct PutCallTotals {
    /// `null` when there is no call open interest to divide by.
    pcr_oi: Option<f64>,
    pcr_volume: Option<f64>,
    total_call_oi: u64,
    total_put_oi: u64,
    total_call_volume: u64,
    total_put_volume: u64,
}

impl PutCallTotals {
    fn of<'a>(rows: impl IntoIterator<Item = &'a ChainRow>) -> PutCallTotals {
        let mut totals = PutCallTotals::default();
        for row in rows {
            totals.total_call_oi += row.call.open_interest;
            totals.total_put_oi += row.put.open_interest;
            totals.total_call_volume += row.call.volume;
            totals.total_put_volume += row.put.volume;
        }
        totals.pcr_oi = ratio(totals.total_put_oi, totals.total_call_oi);
        totals.pcr_volume = ratio(totals.total_put_volume, totals.total_call_volume);
        totals
    }
}

fn ratio(puts: u64, calls: u64) -> Option<f64> {
    (calls > 0).then(|| market::round(puts as f64 / calls as f64, 4))
}

#[derive(Serialize)]
struct ExpiryPcr {
    expiry: String,
    #[serde(flatten)]
    totals: PutCallTotals,
}

#[derive(Serialize)]
struct PcrResponse {
    product: &'static str,
    /// The `expiry` filter, or `null` when the totals cover every listed expiry.
    expiry: Option<String>,
    timestamp: String,
    /// Across everything in `by_expiry`.
    #[serde(flatten)]
    totals: PutCallTotals,
    by_expiry: Vec<ExpiryPcr>,
}

async fn pcr(
    State(market): State<Arc<Market>>,
    Path(product): Path<String>,
    query: Result<Query<ExpiryQuery>, QueryRejection>,
) -> Result<Json<PcrResponse>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let spec = product_or_404(&product)?;
    let expiry = expiry_filter(&market, spec, query.expiry.as_deref())?;
    let chain = market.chain(spec, expiry);

    let by_expiry: Vec<ExpiryPcr> = market
        .expiries(spec)
        .into_iter()
        .filter(|listed| expiry.is_none_or(|wanted| wanted == *listed))
        .map(|listed| ExpiryPcr {
            expiry: listed.format("%Y-%m-%d").to_string(),
            totals: PutCallTotals::of(chain.iter().filter(|row| row.expiry == listed)),
        })
        .collect();

    Ok(Json(PcrResponse {
        product: spec.symbol,
        expiry: expiry.map(|date| date.format("%Y-%m-%d").to_string()),
        timestamp: market::rfc3339(market::REFERENCE_TIME),
        totals: PutCallTotals::of(&chain),
        by_expiry,
    }))
}

async fn volatility_surface(
    State(market): State<Arc<Market>>,
    Path(product): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let spec = product_or_404(&product)?;
    let spot = market.spot(spec);
    let strikes = market.strikes(spec);
    let expiries = market.expiries(spec);
    let chain = market.chain(spec, None);
    // The listed strike nearest spot; `strikes` is centred on it.
    let atm_strike = strikes[strikes.len() / 2];

    let mut iv_rows = Vec::with_capacity(expiries.len());
    let mut term_structure = Vec::with_capacity(expiries.len());
    for &expiry in &expiries {
        let rows: Vec<&ChainRow> = chain.iter().filter(|row| row.expiry == expiry).collect();
        // Calls and puts share one vol per strike in this model, so either side will do.
        iv_rows.push(rows.iter().map(|row| row.call.iv).collect::<Vec<f64>>());
        let atm_iv = rows
            .iter()
            .find(|row| row.strike == atm_strike)
            .map(|row| row.call.iv);
        term_structure.push(json!({
            "expiry": expiry.format("%Y-%m-%d").to_string(),
            "days_to_expiry": market::round(market::days_to_expiry(expiry), 2),
            "atm_iv": atm_iv,
        }));
    }

    Ok(Json(json!({
        "product": spec.symbol,
        "spot": spot,
        "timestamp": market::rfc3339(market::REFERENCE_TIME),
        "strikes": strikes,
        "expiries": date_strings(&expiries),
        "iv": iv_rows,
        "atm_term_structure": term_structure,
    })))
}
