//! CORS for the public listener: every header value computed once from `[cors]`, kept in the
//! shared state ([`super::AppState::cors`]) so the listener's CORS answers and the WebSocket
//! handshake's `Origin` check read one policy.
//!
//! The rules are those tower-http's `CorsLayer` applied here before (same headers, same
//! values, same preflight answer), without its per-request work: it rebuilt the `Vary` value
//! and a header map for every request, and its `call` needs `&mut self`, which meant one lock
//! shared by every connection. Measured on the cache-hit path: ~1 us of ~10 us CPU per request.
//!
//! - Any `OPTIONS` request is a preflight: answered here with `200`, an empty body and the
//!   allow-* headers; it never reaches a route or an upstream.
//! - Every other response gets `Vary: origin` when the allowed origins are a list (the
//!   answer then depends on `Origin`; with `"*"` it does not, and a needless `Vary` splits
//!   every cache in front by origin), appended so the upstream's own `Vary` stays,
//!   `Access-Control-Allow-Origin` when the origin is allowed, `Access-Control-Allow-Credentials`
//!   when configured, and `Access-Control-Expose-Headers` for the gateway's own headers.

use axum::body::Body;
use axum::response::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::CorsConfig;

/// Headers the gateway adds that a browser script may read.
const EXPOSED: [&str; 6] = [
    "x-request-id",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "x-cache",
    "x-upstream-attempts",
];

#[derive(Debug)]
enum Origins {
    /// `["*"]`: `Access-Control-Allow-Origin: *`.
    Any,
    /// Exact origins: the request's `Origin` is echoed when it is one of them.
    List(Vec<HeaderValue>),
}

#[derive(Debug)]
enum AllowHeaders {
    /// `["*"]`: the preflight's `Access-Control-Request-Headers`, echoed.
    Mirror,
    /// The configured names, comma-separated (`None`: the list is empty).
    List(Option<HeaderValue>),
}

/// The CORS rules of the public listener.
#[derive(Debug)]
pub struct Cors {
    origins: Origins,
    credentials: bool,
    allow_methods: Option<HeaderValue>,
    allow_headers: AllowHeaders,
    max_age: HeaderValue,
    /// A preflight's `Vary`: its answer depends on the request-method and -headers too.
    vary: HeaderValue,
    /// An actual response's `Vary`: `origin` for a list of origins, none for `"*"`.
    actual_vary: Option<HeaderValue>,
    expose: HeaderValue,
}

static ANY: HeaderValue = HeaderValue::from_static("*");
static TRUE: HeaderValue = HeaderValue::from_static("true");

/// `a,b,c`; `None` for no values (the header is then left out).
fn comma_separated<S: AsRef<str>>(values: &[S]) -> Option<HeaderValue> {
    let joined = values
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",");
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

impl Cors {
    pub fn new(c: &CorsConfig) -> Cors {
        let origins = if c.allowed_origins.iter().any(|o| o == "*") {
            Origins::Any
        } else {
            Origins::List(
                c.allowed_origins
                    .iter()
                    .filter_map(|o| o.parse().ok())
                    .collect(),
            )
        };
        let allow_headers = if c.allowed_headers.iter().any(|h| h == "*") {
            AllowHeaders::Mirror
        } else {
            // Names are sent lowercase, as `HeaderName` normalises them; invalid ones were
            // refused by config validation and are skipped rather than sent broken.
            let names: Vec<HeaderName> = c
                .allowed_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect();
            AllowHeaders::List(comma_separated(&names))
        };
        let methods: Vec<http::Method> = c
            .allowed_methods
            .iter()
            .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
            .collect();
        let actual_vary = match origins {
            Origins::Any => None,
            Origins::List(_) => Some(HeaderValue::from_static("origin")),
        };
        Cors {
            actual_vary,
            origins,
            credentials: c.allow_credentials,
            allow_methods: comma_separated(&methods),
            allow_headers,
            max_age: HeaderValue::from(c.max_age.0.as_secs()),
            vary: HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
            expose: comma_separated(&EXPOSED).unwrap_or_else(|| HeaderValue::from_static("")),
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request with these headers, if any.
    /// Read before the request moves on, applied to its response by [`Cors::apply`].
    pub fn allowed_origin(&self, request: &HeaderMap) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(ANY.clone()),
            Origins::List(_) => request
                .get(header::ORIGIN)
                .filter(|o| self.allows(o))
                .cloned(),
        }
    }

    /// Whether a page from `origin` may use the gateway: what CORS grants a script, and what
    /// a WebSocket handshake's `Origin` must be (browsers apply no CORS to WebSockets, so
    /// the gateway checks it itself).
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            Origins::Any => true,
            Origins::List(list) => list.contains(origin),
        }
    }

    /// Adds the CORS headers of an actual (non-preflight) response.
    pub fn apply(&self, allowed_origin: Option<HeaderValue>, response: &mut HeaderMap) {
        response.reserve(4);
        if let Some(vary) = &self.actual_vary {
            response.append(header::VARY, vary.clone());
        }
        if let Some(origin) = allowed_origin {
            response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        if self.credentials {
            response.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
        }
        response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, self.expose.clone());
    }

    /// The answer to a preflight (any `OPTIONS` request).
    pub fn preflight(&self, request: &HeaderMap) -> Response {
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        if self.credentials {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
        }
        headers.insert(header::VARY, self.vary.clone());
        if let Some(methods) = &self.allow_methods {
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods.clone());
        }
        let allow_headers = match &self.allow_headers {
            AllowHeaders::Mirror => request.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned(),
            AllowHeaders::List(list) => list.clone(),
        };
        if let Some(allow_headers) = allow_headers {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        }
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if let Some(origin) = self.allowed_origin(request) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], headers: &[&str], credentials: bool) -> Cors {
        let mut c = crate::config::Config::default().cors;
        c.allowed_origins = origins.iter().map(|s| s.to_string()).collect();
        c.allowed_headers = headers.iter().map(|s| s.to_string()).collect();
        c.allowed_methods = vec!["GET".into(), "POST".into()];
        c.allow_credentials = credentials;
        c.max_age = crate::config::Dur(std::time::Duration::from_secs(600));
        Cors::new(&c)
    }

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn preflight_lists_methods_mirrors_headers_and_sets_max_age() {
        let c = cors(&["*"], &["*"], false);
        let r = c.preflight(&request(&[
            ("origin", "https://app.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization, x-trace"),
        ]));
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "authorization, x-trace");
        assert_eq!(h["access-control-max-age"], "600");
        assert!(h["vary"].to_str().unwrap().starts_with("origin"));
        assert!(!h.contains_key("access-control-allow-credentials"));
    }

    #[test]
    fn listed_headers_and_origins_are_exact() {
        let c = cors(
            &["https://ok.example"],
            &["Authorization", "Content-Type"],
            true,
        );
        let r = c.preflight(&request(&[
            ("origin", "https://evil.example"),
            ("access-control-request-headers", "x-anything"),
        ]));
        let h = r.headers();
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization,content-type"
        );
        assert!(!h.contains_key("access-control-allow-origin"));
        assert_eq!(h["access-control-allow-credentials"], "true");

        assert_eq!(
            c.allowed_origin(&request(&[("origin", "https://ok.example")])),
            Some(HeaderValue::from_static("https://ok.example"))
        );
        assert_eq!(c.allowed_origin(&request(&[])), None);
        assert!(c.allows(&HeaderValue::from_static("https://ok.example")));
        assert!(!c.allows(&HeaderValue::from_static("https://ok.example.evil")));
        assert!(!c.allows(&HeaderValue::from_static("https://OK.example")));
        assert!(cors(&["*"], &[], false).allows(&HeaderValue::from_static("null")));
    }

    #[test]
    fn actual_responses_keep_the_upstreams_vary_and_expose_our_headers() {
        let c = cors(&["*"], &["*"], false);
        let mut resp = request(&[("vary", "accept-encoding")]);
        let origin = c.allowed_origin(&HeaderMap::new());
        c.apply(origin, &mut resp);
        let vary: Vec<_> = resp.get_all("vary").iter().collect();
        assert_eq!(
            vary,
            ["accept-encoding"],
            "any origin: the answer does not vary on it"
        );
        assert_eq!(resp["access-control-allow-origin"], "*");
        let listed = cors(&["https://ok.example"], &["*"], false);
        let mut resp = request(&[("vary", "accept-encoding")]);
        listed.apply(None, &mut resp);
        let vary: Vec<_> = resp.get_all("vary").iter().collect();
        assert_eq!(
            vary,
            ["accept-encoding", "origin"],
            "the upstream's Vary is kept"
        );
        assert_eq!(
            resp["access-control-expose-headers"],
            "x-request-id,retry-after,ratelimit,ratelimit-policy,x-cache,x-upstream-attempts"
        );
    }
}
