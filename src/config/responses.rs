//! What the DeltaStream services answer on each route of the embedded table: the success
//! bodies, field by field as the simulators (`src/sim/`) produce them, and the services' own
//! error statuses (`{"error": "..."}`). The OpenAPI document is generated from these, so a
//! generated client parses every body into typed models; `tests/gateway/openapi_contract.rs` checks
//! them against the simulators' real answers.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::routes::ResponseDoc;

fn number() -> Value {
    json!({"type": "number"})
}

fn integer() -> Value {
    json!({"type": "integer", "minimum": 0})
}

fn string() -> Value {
    json!({"type": "string"})
}

/// `YYYY-MM-DD`: generated clients parse it into a date.
fn date() -> Value {
    json!({"type": "string", "format": "date"})
}

/// RFC 3339 (`2025-01-06T10:00:00Z`): generated clients parse it into a datetime.
fn date_time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn array(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
}

/// A closed object: every property required, nothing else allowed, so the contract check
/// (schemathesis, the tests) fails when a service adds, drops or renames a field.
fn object(title: &str, description: &str, properties: Value) -> Value {
    let required: Vec<&String> = properties
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    json!({
        "title": title,
        "description": description,
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": false,
    })
}

fn ok(description: &str, schema: Value, example: Value) -> ResponseDoc {
    ResponseDoc {
        description: description.into(),
        schema: Some(schema),
        schema_file: None,
        example: Some(example),
    }
}

/// A service's own error: no schema given, so the document uses `ServiceError`.
fn service_error(description: &str, example: &str) -> ResponseDoc {
    ResponseDoc {
        description: description.into(),
        schema: None,
        schema_file: None,
        example: Some(json!({ "error": example })),
    }
}

fn session() -> Value {
    object(
        "Session",
        "A signed-in user: the bearer token for authenticated routes (HS256 JWT, valid 24 h)",
        json!({
            "message": string(),
            "token": string(),
            "user": object("SessionUser", "The account", json!({
                "id": string(),
                "email": {"type": "string", "format": "email"},
                "name": string(),
            })),
        }),
    )
}

fn session_example(message: &str) -> Value {
    json!({
        "message": message,
        "token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMzI5YTYxNy1kYjMwLTAyMzEtMzdjNS0zYzY4ZDdmZThkNjgiLCJlbWFpbCI6ImFkYUBleGFtcGxlLmNvbSJ9.3zJFDoXygAA8QZpyf0HK0_mHpq9VVhTMAdBQQ_i_CFI",
        "user": {"id": "1329a617-db30-0231-37c5-3c68d7fe8d68", "email": "ada@example.com", "name": "Ada"}
    })
}

/// A route's documented answers, plus the failures every service can answer on any route:
/// its own 500, and a 503 when it is overloaded or failing, which the gateway passes through
/// once its retries are spent (a generated client must parse those too, not raise).
fn responses<const N: usize>(entries: [(&str, ResponseDoc); N]) -> BTreeMap<String, ResponseDoc> {
    let mut all: BTreeMap<String, ResponseDoc> = entries
        .into_iter()
        .map(|(status, doc)| (status.to_string(), doc))
        .collect();
    all.insert(
        "500".into(),
        service_error("The service failed", "Internal server error"),
    );
    all.insert(
        "503".into(),
        service_error(
            "The service is overloaded or failing, passed through after the gateway's retries",
            "backlog full",
        ),
    );
    all
}

const UNKNOWN_PRODUCT: &str = "Unknown product: NOPE";

pub fn register() -> BTreeMap<String, ResponseDoc> {
    responses([
        (
            "201",
            ok(
                "Registered and signed in",
                session(),
                session_example("User registered successfully"),
            ),
        ),
        (
            "400",
            service_error(
                "The auth service's: unreadable JSON, an invalid email, a password under 8 \
                 characters or no name",
                "Password must be at least 8 characters",
            ),
        ),
        (
            "409",
            service_error("An account with this email exists", "User already exists"),
        ),
    ])
}

pub fn login() -> BTreeMap<String, ResponseDoc> {
    responses([
        (
            "200",
            ok("Signed in", session(), session_example("Login successful")),
        ),
        (
            "400",
            service_error(
                "The auth service's: unreadable JSON, or no email or password",
                "Email and password are required",
            ),
        ),
        (
            "401",
            service_error(
                "Unknown email or wrong password (the same answer for both)",
                "Invalid credentials",
            ),
        ),
    ])
}

pub fn underlying() -> BTreeMap<String, ResponseDoc> {
    let tick = object(
        "Tick",
        "One price of the underlying",
        json!({"product": string(), "price": number(), "timestamp": date_time()}),
    );
    responses([
        (
            "200",
            ok(
                "Ticks, newest first",
                object(
                    "UnderlyingTicks",
                    "Price ticks of a product's underlying",
                    json!({"product": string(), "count": integer(), "ticks": array(tick)}),
                ),
                json!({
                    "product": "NIFTY",
                    "count": 2,
                    "ticks": [
                        {"product": "NIFTY", "price": 24428.15, "timestamp": "2025-01-06T10:00:00Z"},
                        {"product": "NIFTY", "price": 24427.75, "timestamp": "2025-01-06T09:59:59Z"}
                    ]
                }),
            ),
        ),
        (
            "400",
            service_error(
                "The storage service's: limit not a positive integer, start or end not RFC \
                 3339, or start after end",
                "limit must be a positive integer, got \"0\"",
            ),
        ),
        ("404", service_error("No such product", UNKNOWN_PRODUCT)),
    ])
}

pub fn chain() -> BTreeMap<String, ResponseDoc> {
    // One `OptionQuote` for both sides: a generated client gets one type.
    let quote = object(
        "OptionQuote",
        "A call or put at a strike: prices, session activity, IV and greeks",
        json!({
            "bid": number(), "ask": number(), "last_price": number(),
            "volume": integer(), "open_interest": integer(),
            "iv": number(), "delta": number(), "gamma": number(),
            "theta": number(), "vega": number(),
        }),
    );
    let row = object(
        "ChainRow",
        "A strike of an expiry",
        json!({"expiry": date(), "strike": number(), "call": quote, "put": quote}),
    );
    let example_quote = json!({
        "bid": 135.2, "ask": 135.85, "last_price": 135.3, "volume": 32680,
        "open_interest": 85624, "iv": 0.1583, "delta": 0.4929, "gamma": 0.001138,
        "theta": -25.4237, "vega": 8.8338
    });
    responses([
        (
            "200",
            ok(
                "The chain, ordered by expiry then strike (21 strikes per expiry)",
                object(
                    "OptionChain",
                    "Option chain with greeks (theta per calendar day, vega per 1% of vol)",
                    json!({
                        "product": string(), "spot": number(), "timestamp": date_time(),
                        "risk_free_rate": number(), "expiries": array(date()),
                        "chain": array(row),
                    }),
                ),
                json!({
                    "product": "NIFTY", "spot": 24428.15, "timestamp": "2025-01-06T10:00:00Z",
                    "risk_free_rate": 0.065, "expiries": ["2025-01-09", "2025-01-16"],
                    "chain": [{"expiry": "2025-01-09", "strike": 24450.0,
                               "call": example_quote, "put": example_quote}]
                }),
            ),
        ),
        (
            "400",
            service_error(
                "The storage service's: expiry is not a YYYY-MM-DD date",
                "expiry must be a date like 2025-01-30, got \"soon\"",
            ),
        ),
        (
            "404",
            service_error(
                "No such product, or no such expiry for it",
                "No NIFTY expiry on 2025-01-10",
            ),
        ),
    ])
}

pub fn products() -> BTreeMap<String, ResponseDoc> {
    let product = object(
        "Product",
        "A tradable index and its listed expiries",
        json!({
            "symbol": string(), "lot_size": integer(), "spot": number(),
            "tick_size": number(), "strike_step": number(), "expiries": array(date()),
        }),
    );
    responses([(
        "200",
        ok(
            "Every product",
            object(
                "Products",
                "The tradable products",
                json!({"count": integer(), "products": array(product)}),
            ),
            json!({"count": 1, "products": [{
                "symbol": "NIFTY", "lot_size": 75, "spot": 24428.15, "tick_size": 0.05,
                "strike_step": 50.0, "expiries": ["2025-01-09", "2025-01-16"]
            }]}),
        ),
    )])
}

pub fn pcr() -> BTreeMap<String, ResponseDoc> {
    let totals = || {
        json!({
            "pcr_oi": nullable(number()), "pcr_volume": nullable(number()),
            "total_call_oi": integer(), "total_put_oi": integer(),
            "total_call_volume": integer(), "total_put_volume": integer(),
        })
    };
    let mut by_expiry = totals();
    by_expiry["expiry"] = date();
    let mut whole = totals();
    whole["product"] = string();
    whole["expiry"] = nullable(date());
    whole["timestamp"] = date_time();
    whole["by_expiry"] = array(object(
        "ExpiryPutCallRatio",
        "The ratios and totals of one expiry",
        by_expiry,
    ));
    let example_totals = json!({
        "pcr_oi": 1.0731, "pcr_volume": 1.1641, "total_call_oi": 1481467,
        "total_put_oi": 1589693, "total_call_volume": 854066, "total_put_volume": 994198
    });
    let mut example = example_totals.clone();
    example["product"] = json!("NIFTY");
    example["expiry"] = json!("2025-01-09");
    example["timestamp"] = json!("2025-01-06T10:00:00Z");
    let mut example_row = example_totals;
    example_row["expiry"] = json!("2025-01-09");
    example["by_expiry"] = json!([example_row]);
    responses([
        (
            "200",
            ok(
                "Put-call ratios (put / call, null when there are no calls) over the expiry \
                 asked for, or every listed one",
                object(
                    "PutCallRatio",
                    "Put-call ratio by open interest and volume; expiry is null for all",
                    whole,
                ),
                example,
            ),
        ),
        (
            "400",
            service_error(
                "The analytics service's: expiry is not a YYYY-MM-DD date",
                "expiry must be a date like 2025-01-30, got \"soon\"",
            ),
        ),
        (
            "404",
            service_error("No such product, or no such expiry for it", UNKNOWN_PRODUCT),
        ),
    ])
}

pub fn volatility_surface() -> BTreeMap<String, ResponseDoc> {
    let atm = object(
        "AtmVolatility",
        "At-the-money IV of an expiry (null when its ATM strike is not listed)",
        json!({"expiry": date(), "days_to_expiry": number(), "atm_iv": nullable(number())}),
    );
    responses([
        (
            "200",
            ok(
                "IV per expiry (rows) and strike (columns), and the ATM term structure",
                object(
                    "VolatilitySurface",
                    "Implied-volatility surface: iv[i][j] is expiries[i] at strikes[j]",
                    json!({
                        "product": string(), "spot": number(), "timestamp": date_time(),
                        "strikes": array(number()), "expiries": array(date()),
                        "iv": array(array(number())), "atm_term_structure": array(atm),
                    }),
                ),
                json!({
                    "product": "FINNIFTY", "spot": 22966.35, "timestamp": "2025-01-06T10:00:00Z",
                    "strikes": [22900.0, 22950.0, 23000.0],
                    "expiries": ["2025-01-30"],
                    "iv": [[0.1572, 0.1561, 0.1551]],
                    "atm_term_structure": [{"expiry": "2025-01-30", "days_to_expiry": 24.0, "atm_iv": 0.1561}]
                }),
            ),
        ),
        ("404", service_error("No such product", UNKNOWN_PRODUCT)),
    ])
}

/// `/api/user/me` is answered by the gateway from the verified token (the `User` component).
pub fn user_me() -> BTreeMap<String, ResponseDoc> {
    BTreeMap::from([(
        "200".to_string(),
        ok(
            "The authenticated user",
            json!({"$ref": "#/components/schemas/User"}),
            json!({"user_id": "1329a617-db30-0231-37c5-3c68d7fe8d68", "email": "ada@example.com"}),
        ),
    )])
}
