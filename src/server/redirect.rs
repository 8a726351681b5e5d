//! `[server.redirect_http]`: a plain listener that answers every request with 308 to the same
//! path on https (the public TLS listener's port).
//!
//! The host the redirect names is the configured one (`host`), or else the one the client
//! asked for (the request target's authority, else its single `Host`) when that is a valid
//! `host[:port]` (`config::parse_host_port`: a DNS name or an IP literal). Anything else is
//! 400 with the JSON error: copied unchecked, `Host: evil.example?` became
//! `Location: https://evil.example?:8443/...` (issue 23). No `Strict-Transport-Security`
//! here: it means nothing over plain HTTP (RFC 6797 section 8.1), it is sent over TLS only.

use axum::body::Body;
use axum::response::IntoResponse;
use http::header::{CONNECTION, HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode, Version};

use crate::config::{parse_host_port, RedirectConfig};
use crate::error::{ErrorReply, GatewayError};

/// What every redirect is built from.
#[derive(Clone, Debug)]
pub(crate) struct Redirect {
    /// `host[:port]` from the configuration (validated), used instead of the client's.
    configured: Option<String>,
    /// The TLS listener's port, named unless it is 443 (or the configured host has a port).
    https_port: u16,
}

impl Redirect {
    pub(crate) fn new(cfg: &RedirectConfig, https_port: u16) -> Redirect {
        Redirect {
            configured: cfg.host.clone(),
            https_port,
        }
    }

    /// The answer to `req`: 308 to https, or 400 when the host it names is not one.
    pub(crate) fn answer<B>(&self, req: &Request<B>) -> Response<Body> {
        let mut resp = match self.authority(req) {
            Ok(authority) => {
                let target = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .filter(|p| p.starts_with('/'))
                    .unwrap_or("/");
                let location = HeaderValue::from_str(&format!("https://{authority}{target}"));
                match location {
                    Ok(v) => {
                        let mut resp = Response::new(Body::empty());
                        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
                        resp.headers_mut().insert(LOCATION, v);
                        resp
                    }
                    Err(_) => refusal("invalid request target"),
                }
            }
            Err(why) => refusal(why),
        };
        // Either way the client's next request goes elsewhere: this slot is free at once.
        if req.version() < Version::HTTP_2 {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// `host[:port]` for the Location, or why there is none.
    fn authority<B>(&self, req: &Request<B>) -> Result<String, &'static str> {
        let (host, port) = match &self.configured {
            Some(configured) => parse_host_port(configured).ok_or("invalid configured host")?,
            None => {
                let asked = match req.uri().authority() {
                    Some(a) => a.as_str(),
                    None => {
                        let mut hosts = req.headers().get_all(HOST).iter();
                        match (hosts.next(), hosts.next()) {
                            (Some(h), None) => h.to_str().map_err(|_| "invalid Host header")?,
                            (None, _) => return Err("missing Host header"),
                            (Some(_), Some(_)) => return Err("more than one Host header"),
                        }
                    }
                };
                let (host, _port_of_this_listener) =
                    parse_host_port(asked).ok_or("invalid Host header")?;
                (host, None)
            }
        };
        Ok(match port.or(Some(self.https_port).filter(|p| *p != 443)) {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }
}

/// 400 with the JSON error (there is no access layer here: the request id is made for it).
fn refusal(why: &'static str) -> Response<Body> {
    let rid = crate::observability::access::new_request_id();
    ErrorReply {
        error: &GatewayError::BadRequest(why.into()),
        request_id: rid.to_str().unwrap_or(""),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(r: &Redirect, req: Request<()>) -> (StatusCode, Option<String>) {
        let resp = r.answer(&req);
        let loc = resp
            .headers()
            .get(LOCATION)
            .map(|v| v.to_str().unwrap().to_string());
        (resp.status(), loc)
    }

    fn get(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_location_names_a_checked_host_and_the_https_port() {
        let cfg = RedirectConfig {
            port: 8080,
            host: None,
            max_connections: 1,
        };
        let r = Redirect::new(&cfg, 8443);
        assert_eq!(
            location(&r, get("/a?b=1", &["gw.example:8080"])),
            (
                StatusCode::PERMANENT_REDIRECT,
                Some("https://gw.example:8443/a?b=1".into())
            )
        );
        let on_443 = Redirect::new(&cfg, 443);
        assert_eq!(
            location(&on_443, get("/", &["gw.example"])).1.as_deref(),
            Some("https://gw.example/")
        );
        for bad in [&["evil.example?"][..], &[], &["a.example", "b.example"]] {
            let (status, loc) = location(&r, get("/", bad));
            assert_eq!((status, loc), (StatusCode::BAD_REQUEST, None), "{bad:?}");
        }
        let named = Redirect::new(
            &RedirectConfig {
                host: Some("api.example.com".into()),
                ..cfg.clone()
            },
            8443,
        );
        assert_eq!(
            location(&named, get("/x", &["evil.example?"])).1.as_deref(),
            Some("https://api.example.com:8443/x")
        );
        let named_port = Redirect::new(
            &RedirectConfig {
                host: Some("api.example.com:443".into()),
                ..cfg
            },
            8443,
        );
        assert_eq!(
            location(&named_port, get("/", &[])).1.as_deref(),
            Some("https://api.example.com:443/")
        );
    }
}
