//! The compiled route table: config routes turned into matchers and per-route policies,
//! built once at startup so the request path does no parsing or lookups by name.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};

use super::template::{parse_template, Template};
use crate::config::{join, Config, ConfigErrors, FieldError, RouteConfig, RouteKind};

/// One public route with everything the request path needs, resolved.
#[derive(Debug)]
pub struct Route {
    /// Public template text: the `route` label of logs and metrics (never the raw path,
    /// which would explode metric cardinality).
    pub label: Arc<str>,
    /// The public path template the request path is matched against.
    pub template: Template,
    /// Methods served; GET also serves HEAD.
    pub methods: Vec<Method>,
    /// Pre-rendered `Allow` header for 405s.
    pub allow: HeaderValue,
    /// Proxy to an upstream, or answer from the verified token (`/api/user/me`).
    pub kind: RouteKind,
    /// Index into the gateway's upstream list.
    pub upstream: Option<usize>,
    /// The upstream path template, rendered with the public template's parameters.
    pub upstream_template: Option<Template>,
    /// The whole upstream call, retries included, and the time to read the request body.
    pub deadline: Duration,
    /// One upstream attempt, until response headers.
    pub attempt_timeout: Duration,
    /// The route's retry count, replacing the upstream's.
    pub retries: Option<u32>,
    /// Hedge a GET/HEAD whose first attempt has not answered after this long.
    pub hedge_after: Option<Duration>,
    /// Retry a non-idempotent request that may have reached the upstream.
    pub retry_non_idempotent: bool,
    /// Requires a verified bearer token.
    pub auth: bool,
    /// Forward the client's raw query string.
    pub forward_query: bool,
    /// Opt-in shared caching for this route.
    pub cache: Option<crate::config::RouteCachePolicy>,
    /// `Cache-Control` for an upstream response that has none (uncached routes).
    pub cache_control: Option<HeaderValue>,
    /// Whether responses are compressed (the route's setting, else `compression.enabled`).
    pub compress: bool,
    /// Rate-limit policies, resolved to the limiter's handles at startup.
    pub policies: Vec<crate::ratelimit::PolicyId>,
    /// Who is shed first when the upstream is overloaded.
    pub priority: crate::config::Priority,
    /// The route's own latency baseline in its upstream's concurrency limit (its position
    /// in the table, plus one: 0 is calls outside a route).
    pub latency_class: u32,
}

impl Route {
    fn allows(&self, method: &Method) -> bool {
        self.methods.contains(method)
            || (*method == Method::HEAD && self.methods.contains(&Method::GET))
    }
}

pub enum RouteMatch<'t, 'p> {
    Found {
        route: &'t Route,
        /// Raw (still percent-encoded) parameter values in template order.
        params: Vec<&'p str>,
    },
    MethodNotAllowed(&'t Route),
    NotFound,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Most literal segments first, so `/x/products` wins over `/x/{id}`.
    routes: Vec<Route>,
}

/// Strips the optional version prefix: `/api/v1/data/...` serves `/api/data/...`.
/// Allocates only for versioned paths.
pub fn unversioned(path: &str) -> Cow<'_, str> {
    match path.strip_prefix("/api/v1/") {
        Some(rest) => Cow::Owned(format!("/api/{rest}")),
        None => Cow::Borrowed(path),
    }
}

impl RouteTable {
    /// Parses every route's templates, reporting each that does not parse (or whose upstream
    /// template uses a parameter the public one lacks) under its field path.
    pub fn check(cfg: &Config) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if let Err(mut e) = templates(r, &format!("routes[{i}]")) {
                errors.append(&mut e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// `upstream_index` maps an upstream name to its position in the gateway's list.
    /// Templates are parsed here: a route whose template does not parse is an error naming
    /// its field, never silently left out.
    pub fn build(
        cfg: &Config,
        upstream_index: impl Fn(&str) -> Option<usize>,
        policy: impl Fn(&str) -> Option<crate::ratelimit::PolicyId>,
    ) -> Result<RouteTable, ConfigErrors> {
        let mut errors = Vec::new();
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for (i, r) in cfg.routes.iter().enumerate() {
            let (template, upstream_template) = match templates(r, &format!("routes[{i}]")) {
                Ok(t) => t,
                Err(mut e) => {
                    errors.append(&mut e);
                    continue;
                }
            };
            let methods: Vec<Method> = r
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect();
            let mut allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
            if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
                allow.push("HEAD");
            }
            let deadline = r.effective_timeout(cfg).0;
            routes.push(Route {
                label: Arc::from(r.path.as_str()),
                template,
                allow: HeaderValue::from_str(&allow.join(", "))
                    .unwrap_or(HeaderValue::from_static("GET")),
                methods,
                kind: r.kind,
                upstream: r.upstream.as_deref().and_then(&upstream_index),
                upstream_template,
                deadline,
                attempt_timeout: r.attempt_timeout.map(|d| d.0).unwrap_or(deadline),
                retries: r.retries,
                hedge_after: r.hedge_after.map(|d| d.0),
                retry_non_idempotent: r.retry_non_idempotent,
                auth: r.auth || r.kind == RouteKind::UserMe,
                forward_query: r.forward_query,
                cache: r.cache,
                cache_control: r
                    .cache_control
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok()),
                compress: r.compression.unwrap_or(cfg.compression.enabled),
                policies: r.rate_limit.iter().filter_map(|n| policy(n)).collect(),
                priority: r.priority,
                latency_class: u32::try_from(i + 1).unwrap_or(u32::MAX),
            });
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.template.literal_count()));
        Ok(RouteTable { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Finds the route for a raw request path (with or without `/api/v1`).
    pub fn find<'t, 'p>(&'t self, method: &Method, path: &'p str) -> RouteMatch<'t, 'p> {
        // The version prefix is skipped segment-wise, so matching never allocates.
        let Some(rest) = path.strip_prefix('/') else {
            return RouteMatch::NotFound;
        };
        // Up to 8 segments on the stack; longer paths cannot match any route anyway.
        let mut segs: [&str; 8] = [""; 8];
        let mut n = 0;
        let mut versioned = false;
        for (i, s) in rest.split('/').enumerate() {
            if i == 1 && s == "v1" && segs[0] == "api" {
                versioned = true;
                continue;
            }
            if n == segs.len() {
                return RouteMatch::NotFound;
            }
            segs[n] = s;
            n += 1;
        }
        match self.find_segments(method, &segs[..n]) {
            // `/api/v1/ws` serves a route outside `/api` (`/ws`) too.
            RouteMatch::NotFound if versioned && segs.get(1) != Some(&"api") => {
                self.find_segments(method, &segs[1..n])
            }
            found => found,
        }
    }

    fn find_segments<'t, 'p>(&'t self, method: &Method, segs: &[&'p str]) -> RouteMatch<'t, 'p> {
        let mut wrong_method = None;
        for route in &self.routes {
            if let Some(params) = route.template.matches(segs) {
                if route.allows(method) {
                    return RouteMatch::Found { route, params };
                }
                wrong_method.get_or_insert(route);
            }
        }
        match wrong_method {
            Some(r) => RouteMatch::MethodNotAllowed(r),
            None => RouteMatch::NotFound,
        }
    }
}

/// The route's public template and, for proxy routes, its upstream template.
fn templates(r: &RouteConfig, at: &str) -> Result<(Template, Option<Template>), Vec<FieldError>> {
    let mut errors = Vec::new();
    let template = parse_template(&r.path)
        .map_err(|e| errors.push(FieldError::new(join(at, "path"), e)))
        .ok();
    let upstream_template = match r.kind {
        RouteKind::Proxy | RouteKind::Websocket => {
            parse_template(r.upstream_path.as_deref().unwrap_or(&r.path))
                .map_err(|e| errors.push(FieldError::new(join(at, "upstream_path"), e)))
                .ok()
        }
        RouteKind::UserMe => None,
    };
    if let (Some(t), Some(up)) = (&template, &upstream_template) {
        let params = t.param_names();
        for p in up.param_names() {
            if !params.contains(&p) {
                errors.push(FieldError::new(
                    join(at, "upstream_path"),
                    format!("uses {{{p}}} which the route path does not define"),
                ));
            }
        }
    }
    match template {
        Some(t) if errors.is_empty() => Ok((t, upstream_template)),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let cfg = Config::embedded();
        let names: Vec<String> = cfg.upstreams.keys().cloned().collect();
        RouteTable::build(&cfg, |n| names.iter().position(|x| x == n), |_| None).unwrap()
    }

    #[test]
    fn finds_routes_with_and_without_version() {
        let t = table();
        for path in [
            "/api/data/underlying/NIFTY",
            "/api/v1/data/underlying/NIFTY",
        ] {
            match t.find(&Method::GET, path) {
                RouteMatch::Found { route, params } => {
                    assert_eq!(&*route.label, "/api/data/underlying/{product}");
                    assert_eq!(params, vec!["NIFTY"]);
                }
                _ => panic!("no match for {path}"),
            }
        }
        assert!(matches!(
            t.find(&Method::HEAD, "/api/data/products"),
            RouteMatch::Found { .. }
        ));
        assert!(matches!(
            t.find(&Method::GET, "/api/data/nope"),
            RouteMatch::NotFound
        ));
        assert!(matches!(
            t.find(&Method::GET, "/api/v2/data/products"),
            RouteMatch::NotFound
        ));
        // A route outside /api is served under /api/v1 too, and only there.
        for path in ["/ws", "/api/v1/ws"] {
            assert!(
                matches!(t.find(&Method::GET, path), RouteMatch::Found { .. }),
                "{path}"
            );
        }
        assert!(matches!(
            t.find(&Method::GET, "/api/ws"),
            RouteMatch::NotFound
        ));
        assert!(matches!(
            t.find(&Method::GET, "/api/v1/api/data/products"),
            RouteMatch::NotFound
        ));
        assert!(matches!(
            t.find(&Method::GET, "/a/b/c/d/e/f/g/h/i/j"),
            RouteMatch::NotFound
        ));
        match t.find(&Method::GET, "/api/auth/login") {
            RouteMatch::MethodNotAllowed(r) => assert_eq!(r.allow, "POST"),
            _ => panic!("expected 405"),
        }
        match t.find(&Method::DELETE, "/api/data/products") {
            RouteMatch::MethodNotAllowed(r) => assert_eq!(r.allow, "GET, HEAD"),
            _ => panic!("expected 405"),
        }
    }
}
