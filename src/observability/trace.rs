//! W3C trace context (`traceparent`, `tracestate`): a request's trace continues through the
//! gateway to the upstream, so a trace stitches client, gateway and service together.
//!
//! A well-formed `traceparent` is continued from any client, as Envoy and most gateways do
//! (a trace id decides nothing here, so a client that picks one only labels its own
//! requests); a missing or malformed one starts a new trace (and its `tracestate`, which
//! belongs to the lost trace, is dropped). Either way the gateway is a hop of its own: the
//! upstream's parent span is the gateway's span id, made per request. The trace id is in the
//! access line and, with `[tracing] otlp_endpoint`, in the exported spans.
//!
//! The client's `traceparent` is parsed once, by the access layer; from there the context
//! travels as a value: to the request sent upstream ([`TraceContext::forward`] writes its
//! `traceparent`) and to the pipeline, whose attempt spans hang from the gateway's span.

use http::{HeaderMap, HeaderName, HeaderValue};

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// One request's place in its trace (`Copy`: 66 bytes, no heap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's span for this request.
    pub span_id: [u8; 8],
    /// The caller's span, when the trace came with the request.
    pub parent_id: Option<[u8; 8]>,
    /// `01`: sampled.
    pub flags: u8,
    /// `trace_id` as lowercase hex, kept for the log line.
    hex: [u8; 32],
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// `version-traceid-parentid-flags`, version `00` (or a later version with at least these
/// fields, as the spec asks), ids not all zero.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || parse_hex::<1>(version).is_none() {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = parse_hex::<16>(trace).filter(|t| t.iter().any(|b| *b != 0))?;
    let parent = parse_hex::<8>(parent).filter(|p| p.iter().any(|b| *b != 0))?;
    let flags = parse_hex::<1>(flags)?[0];
    Some((trace, parent, flags))
}

/// The trace id, parent span id and flags of `headers`' `traceparent`, when well-formed.
fn traceparent_of(headers: &HeaderMap) -> Option<([u8; 16], [u8; 8], u8)> {
    headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
}

impl TraceContext {
    /// The request's trace: continued from its `traceparent`, or new.
    pub fn continue_or_start(headers: &HeaderMap) -> TraceContext {
        let given = traceparent_of(headers);
        let (trace_id, parent_id, flags) = match given {
            Some((trace, parent, flags)) => (trace, Some(parent), flags),
            None => (rand::random::<[u8; 16]>(), None, 0x01),
        };
        let mut hex = [0u8; 32];
        let _ = hex::encode_to_slice(trace_id, &mut hex);
        TraceContext {
            trace_id,
            span_id: rand::random(),
            parent_id,
            flags,
            hex,
        }
    }

    /// Sets the upstream request's `traceparent` to this trace with the gateway as the
    /// parent; drops a `tracestate` that came without a usable `traceparent`.
    pub fn forward(&self, headers: &mut HeaderMap) {
        let mut value = [0u8; 55];
        value[..3].copy_from_slice(b"00-");
        value[3..35].copy_from_slice(&self.hex);
        value[35] = b'-';
        let _ = hex::encode_to_slice(self.span_id, &mut value[36..52]);
        value[52] = b'-';
        let _ = hex::encode_to_slice([self.flags], &mut value[53..55]);
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert(TRACEPARENT.clone(), v);
        }
        if self.parent_id.is_none() {
            headers.remove(&TRACESTATE);
        }
    }

    pub fn trace_id_hex(&self) -> &str {
        std::str::from_utf8(&self.hex).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT.clone(), HeaderValue::from_str(tp).unwrap());
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("vendor=x"));
        h
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_the_gateway_as_parent() {
        let mut h = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let t = TraceContext::continue_or_start(&h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        t.forward(&mut h);
        let out = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(
            &out[36..52],
            "00f067aa0ba902b7",
            "the gateway is a hop of its own"
        );
        assert_eq!(h[&TRACESTATE], "vendor=x");
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let mut h = if bad.is_empty() {
                HeaderMap::new()
            } else {
                headers(bad)
            };
            let t = TraceContext::continue_or_start(&h);
            assert_eq!(t.parent_id, None, "{bad:?}");
            t.forward(&mut h);
            let out = h[&TRACEPARENT].to_str().unwrap();
            assert_eq!(out.len(), 55);
            assert!(out.contains(t.trace_id_hex()));
            assert!(
                !h.contains_key(&TRACESTATE),
                "{bad:?}: a lost trace's state was kept"
            );
        }
        // A later version with more fields is read as 00.
        let t = TraceContext::continue_or_start(&headers(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
        ));
        assert!(t.parent_id.is_some());
    }
}
