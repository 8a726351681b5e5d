//! `[[routes]]`: the public route table as plain data. Templates are parsed (and their
//! errors reported, by field) when `routes::table::RouteTable` is built from this.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cache::RouteCachePolicy;
use super::concurrency::Priority;
use super::schema;
use super::types::{join, Dur, FieldError};
use super::Config;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Forward to the upstream (the generic proxy handler).
    #[default]
    Proxy,
    /// Answer `{"user_id","email"}` from the verified token; no upstream call.
    UserMe,
    /// Relay a WebSocket to the upstream: the edge's policies run at the handshake, then both
    /// directions are relayed frame by frame (`[websocket]` limits).
    Websocket,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ParamLocation {
    Path,
    Query,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamDoc {
    pub name: String,
    #[serde(rename = "in")]
    pub location: ParamLocation,
    #[serde(default)]
    pub required: bool,
    /// JSON-schema type: string, integer, number or boolean.
    #[serde(default = "default_param_type", rename = "type")]
    pub schema_type: String,
    #[serde(default)]
    pub description: String,
    /// OpenAPI format of a string parameter (`date`, `date-time`, ...): generated clients
    /// take a typed value, and API fuzzers send well-formed ones.
    #[serde(default)]
    pub format: Option<String>,
}

/// Formats of string parameters that generators and validators know.
const PARAM_FORMATS: &[&str] = &["date", "date-time", "email", "uuid", "uri", "byte"];

fn default_param_type() -> String {
    "string".into()
}

/// What the OpenAPI document says about a route.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenApiDoc {
    pub summary: String,
    pub description: String,
    pub tags: Vec<String>,
    /// Query parameters (path parameters are documented from the template).
    pub params: Vec<ParamDoc>,
    /// Name of a documented JSON request body (`register`, `login`), if any.
    pub request_body: Option<String>,
    /// What the upstream answers, by status ("200", "404"): its success body and its own
    /// errors, so a generated client gets typed models instead of `{}`. The gateway's own
    /// errors (401, 429, 503, ...) are added by the document generator from the route's
    /// settings; a status in both is documented as either body (`oneOf`).
    pub responses: BTreeMap<String, ResponseDoc>,
}

/// One status a route's upstream answers with, as `[routes.openapi.responses."200"]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseDoc {
    pub description: String,
    /// An OpenAPI 3.0 Schema Object (the JSON Schema subset: `nullable: true`, not
    /// `type: "null"`). Omitted on an error status: the services' `{"error": "..."}`. An
    /// object schema with a `title` becomes a named component (a class in generated clients).
    pub schema: Option<Value>,
    /// A JSON file holding the schema, relative to the config file's directory. Read when
    /// the configuration is loaded (and on every reload), into `schema`.
    pub schema_file: Option<String>,
    /// An example body, shown in the document and Swagger UI.
    pub example: Option<Value>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Public path template, e.g. `/api/data/underlying/{product}`; also served under `/api/v1`.
    pub path: String,
    /// GET also answers HEAD.
    pub methods: Vec<String>,
    pub kind: RouteKind,
    pub upstream: Option<String>,
    /// Upstream path template using the same `{params}`; defaults to `path`.
    pub upstream_path: Option<String>,
    /// Overall deadline including retries; defaults to the upstream's timeout.
    pub timeout: Option<Dur>,
    /// Per-attempt timeout; defaults to the route timeout.
    pub attempt_timeout: Option<Dur>,
    /// Overrides the upstream's retry count.
    pub retries: Option<u32>,
    /// GET/HEAD only: when the first attempt has not answered after this long, a second goes
    /// to another instance and the first answer wins (hedges spend the retry budget).
    pub hedge_after: Option<Dur>,
    /// POST & co. are retried only when the request never reached the upstream, unless set.
    pub retry_non_idempotent: bool,
    /// Require a verified bearer token.
    pub auth: bool,
    /// Rate-limit policy names applied to this route.
    pub rate_limit: Vec<String>,
    /// Forward the client's query string.
    pub forward_query: bool,
    /// Opt in to the shared response cache (GET/HEAD, unauthenticated requests only).
    pub cache: Option<RouteCachePolicy>,
    /// Who is shed first when the upstream is overloaded (`critical`, `default`, `sheddable`).
    pub priority: Priority,
    /// `Cache-Control` sent when the upstream sends none, on an uncached proxy route (e.g.
    /// `"no-store"` for live prices), so no cache in front guesses a lifetime of its own.
    pub cache_control: Option<String>,
    /// Compress this route's responses (`[compression]` decides how); unset follows
    /// `compression.enabled`.
    pub compression: Option<bool>,
    pub openapi: OpenApiDoc,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            path: String::new(),
            methods: vec!["GET".into()],
            kind: RouteKind::Proxy,
            upstream: None,
            upstream_path: None,
            timeout: None,
            attempt_timeout: None,
            retries: None,
            hedge_after: None,
            retry_non_idempotent: false,
            auth: false,
            rate_limit: Vec::new(),
            forward_query: true,
            cache: None,
            priority: Priority::Default,
            cache_control: None,
            compression: None,
            openapi: OpenApiDoc::default(),
        }
    }
}

/// Reads every `schema_file` of `routes` (relative to `base`, the config file's directory)
/// into its `schema`; errors are numbered as the routes of that file.
pub(super) fn load_schema_files(
    routes: &mut [RouteConfig],
    base: &std::path::Path,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (i, route) in routes.iter_mut().enumerate() {
        for (status, doc) in &mut route.openapi.responses {
            let Some(file) = &doc.schema_file else {
                continue;
            };
            let field = format!("routes[{i}].openapi.responses.{status}.schema_file");
            if doc.schema.is_some() {
                errors.push(FieldError::new(
                    field,
                    "give schema or schema_file, not both",
                ));
                continue;
            }
            match schema::read_schema_file(&base.join(file)) {
                Ok(schema) => doc.schema = Some(schema),
                Err(why) => errors.push(FieldError::new(field, why)),
            }
        }
    }
    errors
}

impl RouteConfig {
    /// Everything but the templates, which `routes::table::RouteTable::build` parses and
    /// reports under the same field paths.
    pub fn validate(&self, path: &str, cfg: &Config, errors: &mut Vec<FieldError>) {
        if self.path.starts_with("/api/v1/") {
            errors.push(FieldError::new(
                join(path, "path"),
                "give the unversioned path; every route is also served under /api/v1",
            ));
        }
        if self.methods.is_empty() {
            errors.push(FieldError::new(
                join(path, "methods"),
                "must list at least one method",
            ));
        }
        for (i, m) in self.methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
                errors.push(FieldError::new(
                    format!("{path}.methods[{i}]"),
                    format!("invalid HTTP method {m:?} (use upper case, e.g. \"GET\")"),
                ));
            }
        }
        if self.kind == RouteKind::Websocket {
            if self.methods != ["GET"] {
                errors.push(FieldError::new(
                    join(path, "methods"),
                    "a websocket route is GET only (the handshake)",
                ));
            }
            if self.cache.is_some() {
                errors.push(FieldError::new(
                    join(path, "cache"),
                    "a websocket route cannot be cached",
                ));
            }
        }
        match self.kind {
            RouteKind::Proxy | RouteKind::Websocket => match &self.upstream {
                None => errors.push(FieldError::new(
                    join(path, "upstream"),
                    "required for proxy and websocket routes",
                )),
                Some(u) if !cfg.upstreams.contains_key(u) => errors.push(FieldError::new(
                    join(path, "upstream"),
                    format!(
                        "no upstream named {u:?} (known: {})",
                        cfg.upstreams.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )),
                Some(_) => {}
            },
            RouteKind::UserMe => {}
        }
        if self.hedge_after.is_some() && !self.methods.iter().any(|m| m == "GET" || m == "HEAD") {
            errors.push(FieldError::new(
                join(path, "hedge_after"),
                "only GET/HEAD requests are hedged, and this route serves neither",
            ));
        }
        for (field, d) in [
            ("timeout", self.timeout),
            ("attempt_timeout", self.attempt_timeout),
            ("hedge_after", self.hedge_after),
        ] {
            if d.is_some_and(|d| d.0.is_zero()) {
                errors.push(FieldError::new(join(path, field), "must be greater than 0"));
            }
        }
        for (i, name) in self.rate_limit.iter().enumerate() {
            if !cfg.rate_limit.policies.iter().any(|p| p.name == *name)
                && super::ratelimit::builtin_policy(name).is_none()
            {
                errors.push(FieldError::new(
                    format!("{path}.rate_limit[{i}]"),
                    format!(
                        "no rate-limit policy named {name:?} (known: {})",
                        cfg.rate_limit
                            .policies
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if let Some(policy) = &self.cache {
            policy.validate(&join(path, "cache"), errors);
            if !self.methods.iter().any(|m| m == "GET" || m == "HEAD") {
                errors.push(FieldError::new(
                    join(path, "cache"),
                    "only GET/HEAD responses are cached, and this route serves neither",
                ));
            }
            if self.auth {
                errors.push(FieldError::new(
                    join(path, "cache"),
                    "responses to authenticated requests are never shared; remove cache or auth",
                ));
            }
        }
        if let Some(value) = &self.cache_control {
            self.validate_cache_control(join(path, "cache_control"), value, errors);
        }
        for (i, p) in self.openapi.params.iter().enumerate() {
            if !matches!(
                p.schema_type.as_str(),
                "string" | "integer" | "number" | "boolean"
            ) {
                errors.push(FieldError::new(
                    format!("{path}.openapi.params[{i}].type"),
                    format!("unknown type {:?}", p.schema_type),
                ));
            }
            if let Some(format) = &p.format {
                if p.schema_type != "string" || !PARAM_FORMATS.contains(&format.as_str()) {
                    errors.push(FieldError::new(
                        format!("{path}.openapi.params[{i}].format"),
                        format!(
                            "{format:?} is not a format of a {} parameter (string formats: {})",
                            p.schema_type,
                            PARAM_FORMATS.join(", ")
                        ),
                    ));
                }
            }
        }
        self.validate_responses(path, cfg, errors);
        self.validate_operation_ids(path, cfg, errors);
    }

    /// The documented responses: real statuses, OpenAPI 3.0 schemas, `$ref`s that resolve,
    /// and titles that name one schema across the whole table.
    fn validate_cache_control(&self, field: String, value: &str, errors: &mut Vec<FieldError>) {
        if self.kind != RouteKind::Proxy {
            errors.push(FieldError::new(
                field,
                "only proxy routes pass upstream responses that may lack Cache-Control",
            ));
        } else if self.cache.is_some() {
            errors.push(FieldError::new(
                field,
                "a cached route sends `max-age=<remaining freshness>`; remove cache_control or cache",
            ));
        } else if value.trim().is_empty() || http::HeaderValue::from_str(value).is_err() {
            errors.push(FieldError::new(
                field,
                format!("{value:?} is not a header value (e.g. \"no-store\", \"no-cache\", \"max-age=60\")"),
            ));
        }
    }

    fn validate_responses(&self, path: &str, cfg: &Config, errors: &mut Vec<FieldError>) {
        // Every title the table defines, and the ones routes before this one claimed first.
        let mut all_titles = serde_json::Map::new();
        let mut earlier_titles = serde_json::Map::new();
        let position = cfg.routes.iter().position(|r| std::ptr::eq(r, self));
        for (i, route) in cfg.routes.iter().enumerate() {
            for doc in route.openapi.responses.values() {
                if let Some(schema) = &doc.schema {
                    let _ = schema::hoist_titled(schema, &mut all_titles);
                    if position.is_some_and(|p| i < p) {
                        let _ = schema::hoist_titled(schema, &mut earlier_titles);
                    }
                }
            }
        }
        for (status, doc) in &self.openapi.responses {
            let at = format!("{path}.openapi.responses.{status}");
            match status.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) && status.len() == 3 => {}
                _ => errors.push(FieldError::new(
                    at.clone(),
                    format!("{status:?} is not an HTTP status (100-599)"),
                )),
            }
            let Some(schema) = &doc.schema else {
                continue;
            };
            let at = format!("{at}.schema");
            let mut refs = Vec::new();
            schema::check_schema(schema, &at, errors, &mut refs);
            for (where_, name) in refs {
                if !schema::BUILTIN_SCHEMAS.contains(&name.as_str())
                    && !all_titles.contains_key(&name)
                {
                    errors.push(FieldError::new(
                        format!("{where_}.$ref"),
                        format!(
                            "no schema named {name:?} (built in: {}; or give a route's object \
                             schema that title)",
                            schema::BUILTIN_SCHEMAS.join(", ")
                        ),
                    ));
                }
            }
            let mut mine = earlier_titles.clone();
            match schema::hoist_titled(schema, &mut mine) {
                Ok(_) => {
                    if let Some(name) = mine
                        .keys()
                        .find(|t| schema::BUILTIN_SCHEMAS.contains(&t.as_str()))
                    {
                        errors.push(FieldError::new(
                            at,
                            format!("the title {name:?} is a built-in schema's name"),
                        ));
                    }
                }
                Err(title) => errors.push(FieldError::new(
                    at,
                    format!(
                        "the title {title:?} names a different schema in another route \
                         (one title, one schema: it is a class name in generated clients)"
                    ),
                )),
            }
        }
    }

    /// Operation ids are derived from the path, so two paths may collide (`/a-b`, `/a_b`):
    /// a document with duplicate ids is invalid and breaks client generators.
    fn validate_operation_ids(&self, path: &str, cfg: &Config, errors: &mut Vec<FieldError>) {
        let position = cfg.routes.iter().position(|r| std::ptr::eq(r, self));
        let earlier = cfg
            .routes
            .iter()
            .enumerate()
            .filter(|(i, r)| position.map_or(r.path != self.path, |p| *i < p));
        for (j, other) in earlier {
            for m in &self.methods {
                if other.path != self.path
                    && other.methods.contains(m)
                    && other.operation_id(m) == self.operation_id(m)
                {
                    errors.push(FieldError::new(
                        join(path, "path"),
                        format!(
                            "its {m} operation id {:?} is also routes[{j}]'s ({:?}): rename one",
                            self.operation_id(m),
                            other.path
                        ),
                    ));
                }
            }
        }
    }

    /// The OpenAPI `operationId` of `method` on this route: the method and the path's words,
    /// so it stays the same whatever the route's place in the table (`get_data_products`,
    /// `post_auth_login`, `get_data_underlying_product`).
    pub fn operation_id(&self, method: &str) -> String {
        let mut id = method.to_ascii_lowercase();
        for part in self
            .path
            .split('/')
            .filter(|p| !p.is_empty() && *p != "api")
        {
            id.push('_');
            id.extend(
                part.chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .filter(|c| *c != '_' || !part.starts_with('{')),
            );
        }
        id
    }

    /// Effective deadline for this route.
    pub fn effective_timeout(&self, cfg: &Config) -> Dur {
        self.timeout
            .or_else(|| {
                self.upstream
                    .as_ref()
                    .and_then(|u| cfg.upstreams.get(u))
                    .map(|u| u.timeout)
            })
            .unwrap_or(Dur::from_secs(10))
    }
}
