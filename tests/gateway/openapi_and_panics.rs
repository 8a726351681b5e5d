//! The OpenAPI document passes a real validator (openapi-spec-validator, installed by the
//! test script), and a panicking handler becomes a JSON 500 while the process keeps serving.

use std::process::Command;

use axum::body::Body;
use axum::response::Response;
use deltastream_gateway::config::Config;
use deltastream_gateway::observability::access::{access, RouteInfo};
use http::Request;

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
    // The access layer as the public listener runs it around every request.
    let serve = |path: &'static str| {
        access(
            None,
            Request::get(path).body(Body::empty()).unwrap(),
            None,
            move |_req, _rid, _trace| async move {
                if path == "/boom" {
                    panic!("handler bug with secret details");
                }
                (Response::new(Body::from("fine")), RouteInfo::default())
            },
        )
    };
    let resp = serve("/boom").await;
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
    let resp = serve("/fine").await;
    assert_eq!(resp.status(), 200);
}
