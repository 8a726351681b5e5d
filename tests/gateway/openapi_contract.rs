//! The OpenAPI document is a contract a client generator can trust: the real answers of the
//! demo (the simulated services behind the gateway) and of a gateway whose upstreams are
//! down validate against the schema of their documented status (tests/openapi_conformance.py,
//! with openapi-schema-validator, which scripts/test installs with openapi-spec-validator);
//! and response schemas in the route table load from files next to the config, with errors
//! that name the field.

use crate::support;

use std::path::Path;
use std::process::Command;

use deltastream_gateway::config::Config;
use deltastream_gateway::demo::{start_demo, DemoPorts};
use deltastream_gateway::routes::docs::openapi;
use deltastream_gateway::server::check;
use deltastream_gateway::sim::Service;
use serde_json::{json, Value};
use support::gateway::{client, config_with_upstreams, spawn};
use support::refused_addr;

/// One real answer, for the Python checker.
struct Observed {
    what: &'static str,
    /// The operation's path template and method, as the document names them.
    path: &'static str,
    method: &'static str,
    response: reqwest::Response,
}

async fn record(observed: Observed) -> Value {
    let status = observed.response.status().as_u16();
    let headers: serde_json::Map<String, Value> = observed
        .response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let bytes = observed.response.bytes().await.expect("body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{}: {} {} -> {status}: not JSON: {}",
                observed.what,
                observed.method,
                observed.path,
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    json!({
        "what": observed.what, "path": observed.path, "method": observed.method,
        "status": status, "headers": headers, "body": body,
    })
}

/// Runs the Python checker on `observations` against `doc`; panics with its report.
fn conform(doc: &Value, observations: Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("observed.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&json!({"doc": doc, "observations": observations})).unwrap(),
    )
    .unwrap();
    let out = Command::new("python3")
        .arg("tests/openapi_conformance.py")
        .arg(&input)
        .output()
        .expect("python3 must be installed");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("No module named"),
        "openapi-schema-validator is not installed: run scripts/test (it installs \
         openapi-spec-validator, which brings it)\n{report}"
    );
    assert!(
        out.status.success(),
        "responses do not match the document:\n{report}"
    );
    eprintln!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_real_answers_match_the_documented_schemas_status_by_status() {
    let mut cfg = Config::from_toml(
        r#"
        [limits]
        max_body = "4KiB"
        [[rate_limit.policies]]
        name = "default"
        limit = 1000
        [[rate_limit.policies]]
        name = "auth"
        limit = 12
        "#,
    )
    .expect("config");
    cfg.server.host = "127.0.0.1".parse().unwrap();
    let ports = DemoPorts {
        gateway: 0,
        admin: 0,
        auth: 0,
        storage: 0,
        analytics: 0,
        socket: 0,
        storage_instances: 1,
    };
    let doc = openapi(&cfg);
    let demo = start_demo(cfg, ports, true).await.expect("demo starts");
    let gw = demo.gateway.url();
    let c = client();
    let mut seen = Vec::new();
    macro_rules! observe {
        ($what:expr, $method:expr, $path:expr, $request:expr) => {
            seen.push(
                record(Observed {
                    what: $what,
                    path: $path,
                    method: $method,
                    response: $request.send().await.expect("request"),
                })
                .await,
            )
        };
    }
    const REGISTER: &str = "/api/auth/register";
    const LOGIN: &str = "/api/auth/login";
    let ada = json!({"email": "ada@example.com", "password": "correct-horse", "name": "Ada"});
    observe!(
        "register",
        "post",
        REGISTER,
        c.post(format!("{gw}{REGISTER}")).json(&ada)
    );
    observe!(
        "register again",
        "post",
        REGISTER,
        c.post(format!("{gw}{REGISTER}")).json(&ada)
    );
    observe!(
        "short password",
        "post",
        REGISTER,
        c.post(format!("{gw}{REGISTER}"))
            .json(&json!({"email": "bo@example.com", "password": "short", "name": "Bo"}))
    );
    observe!(
        "unreadable JSON",
        "post",
        REGISTER,
        c.post(format!("{gw}{REGISTER}"))
            .header("content-type", "application/json")
            .body("{not json")
    );
    observe!(
        "body over max_body",
        "post",
        REGISTER,
        c.post(format!("{gw}{REGISTER}"))
            .header("content-type", "application/json")
            .body(vec![b' '; 8192])
    );
    observe!(
        "an Expect the gateway cannot meet",
        "post",
        LOGIN,
        c.post(format!("{gw}{LOGIN}"))
            .header("expect", "something-else")
            .json(&ada)
    );
    let login = c
        .post(format!("{gw}{LOGIN}"))
        .json(&json!({"email": "ada@example.com", "password": "correct-horse"}))
        .send()
        .await
        .expect("login");
    let session: Value = login.json().await.expect("session");
    let token = session["token"].as_str().expect("token").to_string();
    observe!(
        "login",
        "post",
        LOGIN,
        c.post(format!("{gw}{LOGIN}"))
            .json(&json!({"email": "ada@example.com", "password": "correct-horse"}))
    );
    observe!(
        "no password",
        "post",
        LOGIN,
        c.post(format!("{gw}{LOGIN}"))
            .json(&json!({"email": "ada@example.com"}))
    );

    const ME: &str = "/api/user/me";
    observe!(
        "me",
        "get",
        ME,
        c.get(format!("{gw}{ME}")).bearer_auth(&token)
    );
    observe!("me without a token", "get", ME, c.get(format!("{gw}{ME}")));
    observe!(
        "me with a forged token",
        "get",
        ME,
        c.get(format!("{gw}{ME}")).bearer_auth("not.a.token")
    );

    const UNDERLYING: &str = "/api/data/underlying/{product}";
    observe!(
        "ticks",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/NIFTY?limit=5"))
    );
    observe!(
        "ticks in a window",
        "get",
        UNDERLYING,
        c.get(format!(
            "{gw}/api/data/underlying/banknifty?start=2025-01-06T09:59:00Z&end=2025-01-06T10:00:00Z"
        ))
    );
    observe!(
        "unknown product",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/NOPE"))
    );
    observe!(
        "limit 0",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/NIFTY?limit=0"))
    );
    observe!(
        "empty product",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/"))
    );
    observe!(
        "an encoded slash in the product",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/a%2Fb"))
    );
    observe!(
        "a GET with a body",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/NIFTY")).body("x")
    );

    const CHAIN: &str = "/api/data/chain/{product}";
    for (what, query) in [
        ("whole chain", "NIFTY"),
        ("one expiry", "FINNIFTY?expiry=2025-01-30"),
        ("unlisted expiry", "NIFTY?expiry=2025-01-10"),
        ("expiry not a date", "NIFTY?expiry=soon"),
        ("unknown product", "NOPE"),
    ] {
        observe!(
            what,
            "get",
            CHAIN,
            c.get(format!("{gw}/api/data/chain/{query}"))
        );
    }
    const PRODUCTS: &str = "/api/data/products";
    observe!(
        "products",
        "get",
        PRODUCTS,
        c.get(format!("{gw}{PRODUCTS}"))
    );
    observe!(
        "products (cached)",
        "get",
        PRODUCTS,
        c.get(format!("{gw}{PRODUCTS}"))
    );

    const PCR: &str = "/api/analytics/pcr/{product}";
    for (what, query) in [
        ("all expiries", "NIFTY"),
        ("one expiry", "BANKNIFTY?expiry=2025-02-27"),
        ("unlisted expiry", "NIFTY?expiry=2030-01-01"),
        ("expiry not a date", "NIFTY?expiry=2025-13-45"),
        ("unknown product", "NOPE"),
    ] {
        observe!(
            what,
            "get",
            PCR,
            c.get(format!("{gw}/api/analytics/pcr/{query}"))
        );
    }
    const SURFACE: &str = "/api/analytics/volatility-surface/{product}";
    for product in ["NIFTY", "BANKNIFTY", "FINNIFTY", "NOPE"] {
        observe!(
            "surface",
            "get",
            SURFACE,
            c.get(format!("{gw}/api/analytics/volatility-surface/{product}"))
        );
    }
    observe!("not an upgrade", "get", "/ws", c.get(format!("{gw}/ws")));

    // The auth policy allows 12 a minute: wrong passwords until the limiter answers.
    let mut limited = false;
    for _ in 0..20 {
        let r = c
            .post(format!("{gw}{LOGIN}"))
            .json(&json!({"email": "ada@example.com", "password": "wrong-horse"}))
            .send()
            .await
            .expect("login");
        let status = r.status();
        seen.push(
            record(Observed {
                what: "wrong password",
                path: LOGIN,
                method: "post",
                response: r,
            })
            .await,
        );
        if status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the auth policy never answered 429");

    // The services' own failures pass through: storage overloaded (503, after the gateway's
    // retries), analytics failing (500, not retried).
    for (service, fault) in [
        (
            Service::Storage,
            json!({"error_rate": 1.0, "error_status": 503}),
        ),
        (
            Service::Analytics,
            json!({"error_rate": 1.0, "error_status": 500}),
        ),
    ] {
        let addr = demo
            .services
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, a)| *a)
            .expect("service");
        let r = c
            .post(format!("http://{addr}/_faults"))
            .json(&fault)
            .send()
            .await
            .expect("faults");
        assert!(r.status().is_success(), "{}", r.status());
    }
    observe!(
        "storage overloaded",
        "get",
        UNDERLYING,
        c.get(format!("{gw}/api/data/underlying/NIFTY"))
    );
    observe!(
        "analytics failing",
        "get",
        SURFACE,
        // Past the cache, which still holds this surface.
        c.get(format!("{gw}/api/analytics/volatility-surface/NIFTY"))
            .header("cache-control", "no-cache")
    );
    let failures: Vec<_> = seen.iter().rev().take(2).collect();
    assert_eq!(failures[1]["status"], 503, "{}", failures[1]);
    assert_eq!(failures[1]["body"], json!({"error": "injected fault"}));
    assert_eq!(failures[0]["status"], 500, "{}", failures[0]);
    let statuses: Vec<u64> = seen.iter().filter_map(|o| o["status"].as_u64()).collect();
    for expected in [200, 201, 400, 401, 404, 409, 413, 417, 426, 429, 500, 503] {
        assert!(statuses.contains(&expected), "no {expected} observed");
    }
    demo.shutdown().await;

    // The gateway's own 503s: every upstream refuses connections.
    let down = refused_addr().await;
    let gw = spawn(config_with_upstreams(|_| format!("http://{down}"))).await;
    let base = gw.url();
    observe!(
        "storage down",
        "get",
        PRODUCTS,
        c.get(format!("{base}{PRODUCTS}"))
    );
    observe!(
        "analytics down",
        "get",
        PCR,
        c.get(format!("{base}/api/analytics/pcr/NIFTY"))
    );
    observe!(
        "auth down",
        "post",
        LOGIN,
        c.post(format!("{base}{LOGIN}"))
            .json(&json!({"email": "ada@example.com", "password": "correct-horse"}))
    );
    observe!(
        "auth down while verifying",
        "get",
        ME,
        c.get(format!("{base}{ME}")).bearer_auth(&token)
    );
    assert!(seen
        .iter()
        .rev()
        .take(4)
        .all(|o| o["status"] == 503 && o["body"]["reason"].is_string()));
    gw.shutdown().await;

    conform(&doc, seen);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

const THING_ROUTE: &str = r#"
[upstreams.things]
url = "http://127.0.0.1:9"

[[routes]]
path = "/api/things/{id}"
upstream = "things"
"#;

/// Everything `serve` would refuse in `config.toml` (written with `extra` below the route).
fn load_errors(dir: &Path, extra: &str) -> Vec<String> {
    write(dir, "conf/config.toml", &format!("{THING_ROUTE}{extra}"));
    match Config::from_file(&dir.join("conf/config.toml")).and_then(|c| check(&c).map(|_| c)) {
        Ok(_) => panic!("expected errors for:\n{extra}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_schema_file_next_to_the_config_becomes_the_documented_body() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "conf/schemas/thing.json",
        r##"{"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "Thing", "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"},
                           "parts": {"type": "array", "items": {"$ref": "#/components/schemas/Part"}}}}"##,
    );
    write(
        dir.path(),
        "conf/config.toml",
        &format!(
            r#"{THING_ROUTE}
[routes.openapi.responses.200]
description = "The thing"
schema_file = "schemas/thing.json"
example = {{ id = "t1", parts = [] }}

[routes.openapi.responses.404]
description = "No such thing"

[[routes]]
path = "/api/parts/{{id}}"
upstream = "things"
[routes.openapi.responses.200]
schema = {{ title = "Part", type = "object", properties = {{ weight = {{ type = "number", nullable = true }} }} }}
"#
        ),
    );
    // Read relative to the config file's directory, not the current one.
    let cfg = Config::from_file(&dir.path().join("conf/config.toml")).expect("loads");
    check(&cfg).expect("valid");
    let doc = openapi(&cfg);
    let ok = &doc["paths"]["/api/things/{id}"]["get"]["responses"]["200"];
    assert_eq!(ok["description"], "The thing");
    assert_eq!(
        ok["content"]["application/json"]["schema"],
        json!({"$ref": "#/components/schemas/Thing"})
    );
    assert_eq!(ok["content"]["application/json"]["example"]["id"], "t1");
    let thing = &doc["components"]["schemas"]["Thing"];
    assert_eq!(thing["required"], json!(["id"]));
    assert!(
        thing.get("$schema").is_none(),
        "the dialect line is dropped"
    );
    assert!(doc["components"]["schemas"]["Part"].is_object());
    // The upstream's own 404 is the services' error shape, or the gateway's on an empty id.
    assert_eq!(
        doc["paths"]["/api/things/{id}"]["get"]["responses"]["404"]["content"]["application/json"]
            ["schema"],
        json!({"oneOf": [{"$ref": "#/components/schemas/Error"}, {"$ref": "#/components/schemas/ServiceError"}]})
    );
}

#[test]
fn schema_errors_name_the_route_field() {
    let dir = tempfile::tempdir().unwrap();
    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema_file = \"missing.json\"\n",
    );
    assert!(
        errors[0].starts_with("routes[0].openapi.responses.200.schema_file: cannot read ")
            && errors[0].contains("conf/missing.json"),
        "{errors:?}"
    );

    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema_file = \"/dev/zero\"\n",
    );
    assert!(errors[0].contains("not a regular file"), "{errors:?}");

    write(
        dir.path(),
        "conf/bad.json",
        "{\"type\": \"object\",\n oops}",
    );
    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema_file = \"bad.json\"\n",
    );
    assert!(
        errors[0].starts_with("routes[0].openapi.responses.200.schema_file: ")
            && errors[0].contains("is not JSON")
            && errors[0].contains("line 2"),
        "{errors:?}"
    );

    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema_file = \"bad.json\"\nschema = { type = \"object\" }\n",
    );
    assert!(errors[0].contains("not both"), "{errors:?}");

    // Inline schemas are checked once merged: the path counts the embedded routes first.
    let errors = load_errors(
        dir.path(),
        r##"[routes.openapi.responses.200]
schema = { type = ["string", "null"] }
[routes.openapi.responses.20x]
description = "?"
[routes.openapi.responses.404]
schema = { "$ref" = "#/components/schemas/Nope" }
"##,
    );
    let joined = errors.join("\n");
    for expected in [
        ".openapi.responses.200.schema.type: must be one of",
        ".openapi.responses.20x: \"20x\" is not an HTTP status",
        ".openapi.responses.404.schema.$ref: no schema named \"Nope\"",
    ] {
        assert!(
            joined.contains(expected),
            "{expected} missing in:\n{joined}"
        );
    }

    // One title, one schema: the embedded table's `Tick` cannot be redefined.
    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema = { title = \"Tick\", type = \"object\" }\n",
    );
    assert!(
        errors
            .join("\n")
            .contains("the title \"Tick\" names a different schema"),
        "{errors:?}"
    );
    let errors = load_errors(
        dir.path(),
        "[routes.openapi.responses.200]\nschema = { title = \"Error\", type = \"object\" }\n",
    );
    assert!(errors.join("\n").contains("built-in schema"), "{errors:?}");
}

#[test]
fn operation_ids_are_unique_and_do_not_depend_on_the_table_order() {
    let mut cfg = Config::embedded();
    let before = openapi(&cfg);
    cfg.routes.reverse();
    let after = openapi(&cfg);
    for (path, ops) in before["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert_eq!(
                op["operationId"], after["paths"][path][method]["operationId"],
                "{method} {path}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let errors = load_errors(
        dir.path(),
        "[[routes]]\npath = \"/api/things/{id}/a-b\"\nupstream = \"things\"\n\
         [[routes]]\npath = \"/api/things/{id}/a_b\"\nupstream = \"things\"\n",
    );
    assert!(
        errors
            .join("\n")
            .contains("operation id \"get_things_id_a_b\" is also"),
        "{errors:?}"
    );
}

/// The shipped example config documents its underlying route from a schema file; that file
/// is the embedded table's schema, so the example's document promises what the default does.
#[test]
fn the_example_configs_schema_file_is_the_embedded_underlying_schema() {
    let cfg = Config::from_file(Path::new("gateway.example.toml")).expect("example loads");
    let route = cfg
        .routes
        .iter()
        .find(|r| r.path == "/api/data/underlying/{product}")
        .expect("the example's route");
    let embedded = deltastream_gateway::config::responses::underlying();
    assert_eq!(
        route.openapi.responses["200"].schema, embedded["200"].schema,
        "docs/schemas/underlying-ticks.json differs from the embedded table's schema"
    );
    let doc = openapi(&cfg);
    assert_eq!(
        doc["paths"]["/api/data/underlying/{product}"]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"],
        json!({"$ref": "#/components/schemas/UnderlyingTicks"})
    );
}
