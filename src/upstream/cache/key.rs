//! What identifies a cached response: the resource (route, upstream, path, query) and, when
//! the stored response carries `Vary`, the variant (the request's values of the headers it
//! names).
//!
//! The path and query are exactly the bytes the gateway forwards (the rendered upstream path
//! and the client's raw query), never a normalised form: two requests that send different
//! targets to the upstream can never share an entry. A normalised key (parameters sorted,
//! empty ones and a leading extra `?` dropped) once let a crafted query store its answer under
//! another query's key, so later clients of that query got it as a HIT.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// The part of a key known before any response is seen. It is also the single-flight key:
/// concurrent requests for one resource wait for one upstream call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Resource {
    /// Route id (template) the entry belongs to: lets an admin purge one route and labels
    /// metrics without raw paths. Two routes never share entries: their policies may differ.
    pub(super) route: Arc<str>,
    /// Upstream name, used as a metrics label as well, hence shared rather than copied.
    pub(super) upstream: Arc<str>,
    pub(super) path: Box<str>,
    /// The raw query as forwarded ("" when absent or empty: both forward no `?`).
    pub(super) query: Box<str>,
}

impl Resource {
    /// Approximate heap bytes, for the cache's byte budget.
    pub(super) fn weight(&self) -> usize {
        self.route.len() + self.upstream.len() + self.path.len() + self.query.len()
    }
}

/// Key of a cacheable request. GET and HEAD share one key class: a HEAD is answered from the
/// GET entry with the body left out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub(super) resource: Arc<Resource>,
    /// Only tells the cache to drop the body from what it returns; the stored entry is the GET's.
    pub(super) head: bool,
}

impl CacheKey {
    /// A key with no route yet (see [`CacheKey::with_route`]).
    pub(super) fn new(upstream: &str, path: &str, query: Option<&str>) -> CacheKey {
        CacheKey::for_route(&Arc::from(""), &Arc::from(upstream), path, query)
    }

    /// The key of a request on `route` (its template: see [`CacheKey::with_route`]) to
    /// `upstream` at `path?query`, sharing the route's and upstream's names instead of
    /// copying them: what the request path uses, one allocation fewer per name.
    pub(super) fn for_route(
        route: &Arc<str>,
        upstream: &Arc<str>,
        path: &str,
        query: Option<&str>,
    ) -> CacheKey {
        CacheKey {
            resource: Arc::new(Resource {
                route: route.clone(),
                upstream: upstream.clone(),
                path: path.into(),
                query: query.unwrap_or("").into(),
            }),
            head: false,
        }
    }

    /// Tags the key with the route id (template, e.g. `/api/analytics/*`), which is what
    /// `purge_route` and the metrics labels use.
    pub fn with_route(self, route: &str) -> CacheKey {
        let mut resource = Arc::unwrap_or_clone(self.resource);
        resource.route = Arc::from(route);
        CacheKey {
            resource: Arc::new(resource),
            head: self.head,
        }
    }

    /// Marks a HEAD request so the answer carries no body. The entry itself is shared with GET.
    pub fn for_method(mut self, method: &Method) -> CacheKey {
        self.head = method == Method::HEAD;
        self
    }

    pub fn route(&self) -> &str {
        &self.resource.route
    }

    pub fn upstream(&self) -> &str {
        &self.resource.upstream
    }

    pub fn path(&self) -> &str {
        &self.resource.path
    }

    /// The query as forwarded ("" when there is none).
    pub fn query(&self) -> &str {
        &self.resource.query
    }
}

/// The header names a response varies on, as its `Vary` header lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Vary {
    /// Sorted, lowercase, without duplicates; empty when the response has no `Vary`.
    Names(Arc<[HeaderName]>),
    /// `Vary: *` (or a name we cannot parse): every request is a different variant, so the
    /// response is never stored nor shared.
    Any,
}

impl Vary {
    pub(super) fn of(response_headers: &HeaderMap) -> Vary {
        let mut names = Vec::new();
        for value in response_headers.get_all(http::header::VARY) {
            let Ok(value) = value.to_str() else {
                return Vary::Any;
            };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Vary::Any;
                }
                match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    Ok(name) => names.push(name),
                    Err(_) => return Vary::Any,
                }
            }
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        Vary::Names(names.into())
    }
}

/// Which stored response of a resource a request selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Variant {
    /// The slot every lookup reads first: the response itself when it has no `Vary`, or the
    /// index naming the headers its variants differ by.
    Primary,
    /// The request's values of the headers named by `Vary` (absent header = empty list).
    Values(Vec<(HeaderName, Vec<HeaderValue>)>),
}

impl Variant {
    pub(super) fn of(names: &[HeaderName], request_headers: &HeaderMap) -> Variant {
        Variant::Values(
            names
                .iter()
                .map(|name| {
                    let values = request_headers.get_all(name).iter().cloned().collect();
                    (name.clone(), values)
                })
                .collect(),
        )
    }

    pub(super) fn weight(&self) -> usize {
        match self {
            Variant::Primary => 0,
            Variant::Values(values) => values
                .iter()
                .map(|(n, vs)| n.as_str().len() + vs.iter().map(|v| v.len()).sum::<usize>())
                .sum(),
        }
    }
}

/// Key of one moka entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct StoreKey {
    pub(super) resource: Arc<Resource>,
    pub(super) variant: Variant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(upstream: &str, path: &str, query: Option<&str>) -> CacheKey {
        CacheKey::new(upstream, path, query)
    }

    #[test]
    fn the_query_is_keyed_byte_for_byte_as_forwarded() {
        // Each of these forwards a different request target, so none may share an entry.
        let distinct = [
            "a=1&b=2", "b=2&a=1", "?a=1", "a=1&&", "a=1&", "&a=1", "a=2&a=1", "a=1&a=2", "a=%31",
        ];
        for (i, q1) in distinct.iter().enumerate() {
            for q2 in &distinct[i + 1..] {
                assert_ne!(
                    key("s", "/p", Some(q1)),
                    key("s", "/p", Some(q2)),
                    "{q1} vs {q2}"
                );
            }
        }
        // An empty query forwards no `?` at all, exactly like no query.
        assert_eq!(key("s", "/p", Some("")), key("s", "/p", None));
        assert_eq!(key("s", "/p", Some("b=2&a=1")).query(), "b=2&a=1");
    }

    #[test]
    fn upstream_path_and_route_distinguish_keys() {
        let base = key("storage", "/products", None);
        assert_ne!(base, key("analytics", "/products", None));
        assert_ne!(base, key("storage", "/products/x", None));
        assert_ne!(
            base.clone().with_route("/api/data/products"),
            base.clone().with_route("/api/v1/data/products")
        );
    }

    #[test]
    fn head_and_get_share_the_resource() {
        let get = key("storage", "/products", None);
        let head = get.clone().for_method(&Method::HEAD);
        assert!(head.head && !get.head);
        assert_eq!(get.resource, head.resource);
    }

    #[test]
    fn vary_names_are_normalised() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::VARY,
            HeaderValue::from_static("Accept-Language, accept"),
        );
        h.append(http::header::VARY, HeaderValue::from_static("accept"));
        let Vary::Names(names) = Vary::of(&h) else {
            panic!("expected names");
        };
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "accept-language"]);

        h.append(http::header::VARY, HeaderValue::from_static("*"));
        assert_eq!(Vary::of(&h), Vary::Any);
    }
}
