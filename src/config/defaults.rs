//! The embedded default: the DeltaStream route table (GUIDE section 1), so that
//! `deltastream-gateway serve` behaves like the original service with zero files.

use std::collections::BTreeMap;

use super::responses;
use super::{
    Dur, OpenApiDoc, ParamDoc, ParamLocation, Priority, RouteCachePolicy, RouteConfig, RouteKind,
    UpstreamConfig,
};

pub fn upstreams() -> BTreeMap<String, UpstreamConfig> {
    [
        ("auth", "http://auth:8001", 10),
        ("storage", "http://storage:8003", 10),
        ("analytics", "http://analytics:8004", 30),
        ("socket", "http://socket:8002", 10),
    ]
    .into_iter()
    .map(|(name, url, secs)| {
        (
            name.to_string(),
            UpstreamConfig {
                url: url.into(),
                timeout: Dur::from_secs(secs),
                ..UpstreamConfig::default()
            },
        )
    })
    .collect()
}

fn query(name: &str, schema_type: &str, description: &str) -> ParamDoc {
    ParamDoc {
        name: name.into(),
        location: ParamLocation::Query,
        required: false,
        schema_type: schema_type.into(),
        description: description.into(),
        format: None,
    }
}

/// A query parameter that is a string in `format` (`date`, `date-time`).
fn formatted(format: &str, mut param: ParamDoc) -> ParamDoc {
    param.format = Some(format.into());
    param
}

fn doc(tag: &str, summary: &str, params: Vec<ParamDoc>) -> OpenApiDoc {
    OpenApiDoc {
        summary: summary.into(),
        description: String::new(),
        tags: vec![tag.into()],
        params,
        request_body: None,
        responses: BTreeMap::new(),
    }
}

/// `openapi` documenting the upstream's `responses` (see [`responses`]).
fn answering(
    mut openapi: OpenApiDoc,
    responses: BTreeMap<String, super::ResponseDoc>,
) -> OpenApiDoc {
    openapi.responses = responses;
    openapi
}

fn proxy(path: &str, upstream: &str, upstream_path: &str, openapi: OpenApiDoc) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        upstream: Some(upstream.into()),
        upstream_path: Some(upstream_path.into()),
        rate_limit: vec!["default".into()],
        openapi,
        ..RouteConfig::default()
    }
}

fn auth_post(
    path: &str,
    upstream_path: &str,
    summary: &str,
    body: &str,
    responses: BTreeMap<String, super::ResponseDoc>,
) -> RouteConfig {
    let mut openapi = answering(doc("Authentication", summary, Vec::new()), responses);
    openapi.request_body = Some(body.into());
    RouteConfig {
        methods: vec!["POST".into()],
        // Credential stuffing is the threat on these two: a tighter policy than data reads.
        rate_limit: vec!["auth".into()],
        ..proxy(path, "auth", upstream_path, openapi)
    }
}

/// Who is shed first at market open: a user who cannot log in is the incident, so login is
/// critical (token verification is too, in `auth`); registering can wait like a data read;
/// analytics are expensive, cached and retried later by a client at no loss.
fn default_priority(path: &str) -> Priority {
    match path {
        "/api/auth/login" => Priority::Critical,
        p if p.starts_with("/api/analytics/") => Priority::Sheddable,
        _ => Priority::Default,
    }
}

/// Default cache TTLs: a chain moves with every tick (2 s); the product list barely
/// changes (60 s); analytics are expensive and a few seconds old is fine (5 s).
fn default_cache_ttl(path: &str) -> Option<u64> {
    match path {
        "/api/data/chain/{product}" => Some(2),
        "/api/data/products" => Some(60),
        p if p.starts_with("/api/analytics/") => Some(5),
        _ => None,
    }
}

/// What an uncached route says to caches in front when its upstream says nothing: live
/// prices and the answers to logins and registrations are never kept.
fn default_cache_control(route: &RouteConfig) -> Option<&'static str> {
    match route.kind {
        RouteKind::Proxy if route.cache.is_none() => Some("no-store"),
        RouteKind::Proxy | RouteKind::UserMe | RouteKind::Websocket => None,
    }
}

pub fn routes() -> Vec<RouteConfig> {
    let product_ticks = vec![
        query(
            "limit",
            "integer",
            "Number of ticks, newest first (default 100, max 1000)",
        ),
        formatted(
            "date-time",
            query("start", "string", "RFC 3339 start time (inclusive)"),
        ),
        formatted(
            "date-time",
            query("end", "string", "RFC 3339 end time (inclusive)"),
        ),
    ];
    let expiry = || {
        vec![formatted(
            "date",
            query("expiry", "string", "Expiry date (YYYY-MM-DD)"),
        )]
    };
    let mut routes = vec![
        auth_post(
            "/api/auth/register",
            "/register",
            "Register a user",
            "register",
            responses::register(),
        ),
        auth_post(
            "/api/auth/login",
            "/login",
            "Log in and get a token",
            "login",
            responses::login(),
        ),
        proxy(
            "/api/data/underlying/{product}",
            "storage",
            "/underlying/{product}",
            answering(
                doc(
                    "Data",
                    "Underlying price ticks for a product",
                    product_ticks,
                ),
                responses::underlying(),
            ),
        ),
        proxy(
            "/api/data/chain/{product}",
            "storage",
            "/option/chain/{product}",
            answering(
                doc("Data", "Option chain with greeks for a product", expiry()),
                responses::chain(),
            ),
        ),
        proxy(
            "/api/data/products",
            "storage",
            "/products",
            answering(
                doc("Data", "Tradable products", Vec::new()),
                responses::products(),
            ),
        ),
        proxy(
            "/api/analytics/pcr/{product}",
            "analytics",
            "/pcr/{product}",
            answering(
                doc(
                    "Analytics",
                    "Put-call ratio by open interest and volume",
                    expiry(),
                ),
                responses::pcr(),
            ),
        ),
        proxy(
            "/api/analytics/volatility-surface/{product}",
            "analytics",
            "/volatility-surface/{product}",
            answering(
                doc(
                    "Analytics",
                    "Implied-volatility surface and ATM term structure",
                    Vec::new(),
                ),
                responses::volatility_surface(),
            ),
        ),
        RouteConfig {
            path: "/api/user/me".into(),
            kind: RouteKind::UserMe,
            auth: true,
            // Each new token here may cost a verify call: limited like the data routes.
            rate_limit: vec!["default".into()],
            openapi: answering(
                doc("User", "The authenticated user", Vec::new()),
                responses::user_me(),
            ),
            ..RouteConfig::default()
        },
    ];
    routes.push(RouteConfig {
        path: "/ws".into(),
        kind: RouteKind::Websocket,
        upstream: Some("socket".into()),
        upstream_path: Some("/ws".into()),
        // Upgrades are few and long-lived: a tight policy of their own.
        rate_limit: vec!["ws".into()],
        openapi: doc(
            "Real-time",
            "Live ticks over WebSocket: send {\"action\":\"subscribe\",\"products\":[...]}",
            Vec::new(),
        ),
        ..RouteConfig::default()
    });
    for r in &mut routes {
        r.priority = default_priority(&r.path);
        r.cache = default_cache_ttl(&r.path)
            .map(|secs| RouteCachePolicy::new(std::time::Duration::from_secs(secs)));
        r.cache_control = default_cache_control(r).map(str::to_owned);
    }
    routes
}
