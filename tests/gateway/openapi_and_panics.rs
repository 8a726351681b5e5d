//! The OpenAPI document passes a real validator (openapi-spec-validator, installed by the
//! test script), and a panicking handler becomes a JSON 500 while the process keeps serving.

use std::process::Command;

use axum::body::Body;
use axum::Router;
use deltastream_gateway::config::Config;
use deltastream_gateway::observability::access::access_layer;
use http::Request;
use tower::ServiceExt;

#[test]
fn openapi_document_passes_openapi_spec_validator() {
    let doc = deltastream_gateway::routes::docs::openapi(&Config::embedded());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "openapi-spec-validator is not installed: run scripts/test (it installs it) or `pip install openapi-spec-validator`"
    );
    assert!(
        out.status.success(),
        "validator rejected the document:\n{stdout}\n{stderr}"
    );
}

#[tokio::test]
async fn a_panicking_handler_becomes_a_json_500_and_serving_continues() {
    let app: Router = Router::new()
        .route(
            "/boom",
            axum::routing::get(|| async {
                if true {
                    panic!("handler bug with secret details");
                }
                "unreachable"
            }),
        )
        .route("/fine", axum::routing::get(|| async { "fine" }))
        .layer(axum::middleware::from_fn(access_layer));
    let resp = app
        .clone()
        .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().contains_key("x-request-id"));
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["reason"], "internal");
    assert_eq!(v["error"], "Internal server error");
    assert!(
        !String::from_utf8_lossy(&body).contains("secret"),
        "panic details leaked"
    );
    let resp = app
        .oneshot(Request::get("/fine").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
