//! Any request path against the embedded route table: matching, the parameter check and the
//! rewrite never panic, and a path that passes never renders an upstream path outside its
//! template (no extra segments, no dot segments, no slash or backslash smuggled in).
#![no_main]
use std::sync::OnceLock;

use deltastream_gateway::config::Config;
use deltastream_gateway::routes::outgoing::upstream_path;
use deltastream_gateway::routes::table::{RouteMatch, RouteTable};
use deltastream_gateway::routes::template::check_param;
use http::Method;
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let cfg = Config::embedded();
        let names: Vec<String> = cfg.upstreams.keys().cloned().collect();
        RouteTable::build(&cfg, |n| names.iter().position(|x| x == n), |_| None)
            .expect("the embedded route table builds")
    })
}

fuzz_target!(|input: (u8, &str)| {
    let (m, path) = input;
    let method = [Method::GET, Method::POST, Method::HEAD, Method::DELETE][m as usize % 4].clone();
    let RouteMatch::Found { route, params } = table().find(&method, path) else {
        return;
    };
    if params.iter().any(|p| check_param(p).is_err()) {
        return;
    }
    for p in &params {
        let decoded = percent_decode(p);
        assert!(decoded != "." && decoded != "..", "dot segment {p:?}");
        assert!(!decoded.contains(['/', '\\', '%']), "escape in {p:?}");
        assert!(
            !decoded.chars().any(char::is_control),
            "control char in {p:?}"
        );
    }
    let rendered = upstream_path(route, &params);
    let want = route
        .upstream_template
        .as_ref()
        .map_or(0, |t| t.segments.len());
    let got = rendered.trim_start_matches('/').split('/').count();
    assert_eq!(got, want.max(1), "{path:?} rendered {rendered:?}");
    assert!(!rendered.contains("//"), "{rendered:?}");
});

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
