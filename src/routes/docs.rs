//! `/api/docs`: an OpenAPI 3 document generated from the route table (so it cannot drift
//! from what the gateway serves), and `/api/docs/ui`: Swagger UI from vendored assets.

use axum::body::Body;
use axum::response::Response;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::HeaderValue;
use serde_json::{json, Map, Value};

use crate::config::{Config, ParamLocation, RouteKind};

use super::template::{parse_template, Segment};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn request_body(name: &str) -> Value {
    let schema = match name {
        "register" => json!({
            "type": "object",
            "required": ["email", "password", "name"],
            "properties": {
                "email": {"type": "string", "format": "email"},
                "password": {"type": "string", "minLength": 8},
                "name": {"type": "string", "minLength": 1}
            }
        }),
        "login" => json!({
            "type": "object",
            "required": ["email", "password"],
            "properties": {
                "email": {"type": "string", "format": "email"},
                "password": {"type": "string"}
            }
        }),
        _ => json!({"type": "object"}),
    };
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

/// Renders the document for `cfg`'s routes.
pub fn openapi(cfg: &Config) -> Value {
    let mut paths = Map::new();
    for route in &cfg.routes {
        let Ok(template) = parse_template(&route.path) else {
            continue;
        };
        let names = template.param_names();
        let mut parameters: Vec<Value> = template
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(i) => {
                    let mut p = json!({
                        "name": names[*i],
                        "in": "path",
                        "required": true,
                        "schema": {"type": "string"},
                        "description": format!("The {}", names[*i]),
                    });
                    // A value that exists, so clients (and API fuzzers) can reach the 200s.
                    if names[*i] == "product" {
                        p["example"] = json!("NIFTY");
                    }
                    Some(p)
                }
                Segment::Literal(_) => None,
            })
            .collect();
        for p in &route.openapi.params {
            if p.location == ParamLocation::Path {
                continue;
            }
            parameters.push(json!({
                "name": p.name,
                "in": "query",
                "required": p.required,
                "schema": {"type": p.schema_type},
                "description": p.description,
            }));
        }
        let mut responses = Map::new();
        let ok = if route.kind == RouteKind::Websocket {
            json!({"description": "Switching Protocols: the WebSocket is relayed to the upstream"})
        } else if route.kind == RouteKind::UserMe {
            json!({
                "description": "The authenticated user",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}}
            })
        } else {
            json!({
                "description": "The upstream's response, passed through",
                "content": {"application/json": {"schema": {}}}
            })
        };
        let ok_status = if route.kind == RouteKind::Websocket {
            responses.insert(
                "403".into(),
                error_response("Origin not among the CORS origins"),
            );
            responses.insert(
                "426".into(),
                error_response("Not a WebSocket upgrade (Sec-WebSocket-Version 13)"),
            );
            "101"
        } else if route.path.ends_with("/register") {
            "201"
        } else {
            "200"
        };
        responses.insert(ok_status.into(), ok);
        responses.insert("400".into(), error_response("Malformed request"));
        if route.auth || route.kind == RouteKind::UserMe {
            responses.insert("401".into(), error_response("Missing or invalid token"));
        }
        let counts_failures =
            (route.auth || route.kind == RouteKind::UserMe) && !cfg.auth.failure_policy.is_empty();
        if !route.rate_limit.is_empty() || counts_failures {
            responses.insert("429".into(), error_response("Rate limit exceeded"));
        }
        responses.insert(
            "503".into(),
            error_response("Upstream unavailable, timed out or circuit open"),
        );
        responses.insert(
            "default".into(),
            json!({"description": "Any other status the upstream answered, passed through"}),
        );
        let tags = if route.openapi.tags.is_empty() {
            vec!["Gateway".to_string()]
        } else {
            route.openapi.tags.clone()
        };
        let mut ops = Map::new();
        for m in &route.methods {
            let mut op = json!({
                "summary": route.openapi.summary,
                "tags": tags,
                "operationId": operation_id(m, &route.path),
                "parameters": parameters,
                "responses": responses,
            });
            if !route.openapi.description.is_empty() {
                op["description"] = json!(route.openapi.description);
            }
            if route.auth || route.kind == RouteKind::UserMe {
                op["security"] = json!([{"bearerAuth": []}]);
            }
            if let Some(body) = &route.openapi.request_body {
                op["requestBody"] = request_body(body);
            }
            ops.insert(m.to_ascii_lowercase(), op);
        }
        paths.insert(route.path.clone(), Value::Object(ops));
    }
    paths.insert(
        "/health".into(),
        json!({"get": {
            "summary": "Liveness of the gateway",
            "tags": ["Gateway"],
            "operationId": "get_health",
            "responses": {"200": {
                "description": "The gateway is up",
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["status", "service"],
                    "properties": {"status": {"type": "string"}, "service": {"type": "string"}}
                }}}
            }}
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "DeltaStream API Gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Public API of the DeltaStream option-market-data platform. Every path is also served under /api/v1."
        },
        "tags": [
            {"name": "Authentication"}, {"name": "Data"}, {"name": "Analytics"},
            {"name": "User"}, {"name": "Gateway"}
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "reason": {"type": "string"},
                        "request_id": {"type": "string"},
                        "upstream": {"type": "string"}
                    }
                },
                "User": {
                    "type": "object",
                    "required": ["user_id", "email"],
                    "properties": {"user_id": {"type": "string"}, "email": {"type": "string"}}
                }
            }
        }
    })
}

fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != "api") {
        id.push('_');
        id.extend(
            part.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .filter(|c| *c != '_' || !part.starts_with('{')),
        );
    }
    id
}

const UI_PAGE: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>DeltaStream API Gateway - docs</title>
  <link rel="stylesheet" href="/api/docs/ui/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/docs/ui/swagger-ui-bundle.js"></script>
  <script>window.ui = SwaggerUIBundle({url: "/api/docs", dom_id: "#swagger-ui"});</script>
</body>
</html>
"##;

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    resp
}

pub fn ui_page() -> Response {
    asset("text/html; charset=utf-8", UI_PAGE.as_bytes())
}

pub fn ui_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
    )
}

pub fn ui_js() -> Response {
    asset(
        "application/javascript; charset=utf-8",
        include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented() {
        let cfg = Config::embedded();
        let doc = openapi(&cfg);
        for r in &cfg.routes {
            for m in &r.methods {
                assert!(
                    doc["paths"][&r.path][m.to_ascii_lowercase()].is_object(),
                    "{m} {} missing",
                    r.path
                );
            }
        }
        assert_eq!(
            doc["paths"]["/api/user/me"]["get"]["security"][0]["bearerAuth"],
            json!([])
        );
        assert_eq!(
            operation_id("GET", "/api/data/underlying/{product}"),
            "get_data_underlying_product"
        );
    }
}
