//! Response compression negotiated from `Accept-Encoding` (RFC 9110 §12.5.3), applied to the
//! finished response on its way out, after the cache: the cache stores the identity body
//! once, and each answer is compressed for the coding its client asked for.
//!
//! Left as they are: responses already encoded (an upstream's gzip passes through untouched),
//! ranges, `Cache-Control: no-transform`, media types not in `compression.content_types`,
//! bodies of a known size under `min_size` (unless the client refused `identity`), 1xx, 204
//! and 304. Every response that could be compressed says `Vary: Accept-Encoding`, whether or
//! not this client's was.
//!
//! The body is compressed as it streams (never collected first): what the upstream sent is
//! flushed out compressed whenever the upstream pauses, so Server-Sent Events and chunked
//! answers still arrive event by event. The codecs and their framing are async-compression's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, VARY,
};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::Frame;
use tokio::io::AsyncWriteExt;

use crate::config::{CompressionConfig, CompressionLevel};

/// Compressed output is handed on once this much has built up, even while the upstream keeps
/// sending: a large body goes out in pieces, never held whole.
const EMIT_AT: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Br,
    Zstd,
}

impl Coding {
    fn parse(name: &str) -> Option<Coding> {
        if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            Some(Coding::Gzip)
        } else if name.eq_ignore_ascii_case("br") {
            Some(Coding::Br)
        } else if name.eq_ignore_ascii_case("zstd") {
            Some(Coding::Zstd)
        } else {
            None
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Coding::Gzip => "gzip",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
        })
    }

    /// The coding's own scale for the configured level (see `CompressionLevel`).
    fn level(self, level: CompressionLevel) -> Level {
        let precise = match (self, level) {
            (_, CompressionLevel::Fastest) => 1,
            (Coding::Gzip, CompressionLevel::Default) => 6,
            (Coding::Br, CompressionLevel::Default) => 4,
            (Coding::Zstd, CompressionLevel::Default) => 3,
            (Coding::Gzip, CompressionLevel::Best) => 9,
            (Coding::Br, CompressionLevel::Best) => 11,
            (Coding::Zstd, CompressionLevel::Best) => 19,
        };
        Level::Precise(precise)
    }
}

/// What a client's `Accept-Encoding` allows, decided before the request is handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The coding to use, if any is acceptable and preferred over identity.
    pub coding: Option<Coding>,
    /// `identity;q=0` (or `*;q=0` without `identity`): the client refuses an uncompressed
    /// body, so even a small one is compressed when it can be.
    pub identity_refused: bool,
}

/// `[compression]`, resolved once per configuration.
#[derive(Clone, Debug)]
pub struct Compressor {
    /// In the gateway's order of preference, for codings a client weighs equally.
    codings: Vec<Coding>,
    level: CompressionLevel,
    min_size: u64,
    content_types: Vec<String>,
}

/// A quality value (`q=0.5`) in thousandths; `None` when malformed (the element is ignored).
fn qvalue(params: &str) -> Option<u16> {
    for param in params.split(';') {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("q") {
            continue;
        }
        let value = value.trim();
        let q: f32 = value.parse().ok()?;
        if !(0.0..=1.0).contains(&q) || value.len() > 5 {
            return None;
        }
        return Some((q * 1000.0).round() as u16);
    }
    Some(1000)
}

impl Compressor {
    pub fn new(cfg: &CompressionConfig) -> Compressor {
        Compressor {
            codings: cfg
                .codings
                .iter()
                .filter_map(|c| Coding::parse(c))
                .collect(),
            level: cfg.level,
            min_size: cfg.min_size.0,
            content_types: cfg.content_types.clone(),
        }
    }

    /// Reads the request's `Accept-Encoding`. No header: identity (RFC 9110 allows any
    /// coding then, but a client that sent none may not decode one).
    pub fn accepted(&self, request: &HeaderMap) -> Accepted {
        let mut explicit: [Option<u16>; 3] = [None; 3];
        let mut identity = None;
        let mut star = None;
        let mut present = false;
        for value in request.get_all(ACCEPT_ENCODING) {
            present = true;
            let Ok(value) = value.to_str() else { continue };
            for element in value.split(',') {
                let (name, params) = element.split_once(';').unwrap_or((element, ""));
                let name = name.trim();
                if name.is_empty() {
                    continue;
                }
                let Some(q) = qvalue(params) else { continue };
                let slot = if name == "*" {
                    &mut star
                } else if name.eq_ignore_ascii_case("identity") {
                    &mut identity
                } else {
                    match Coding::parse(name) {
                        Some(Coding::Gzip) => &mut explicit[0],
                        Some(Coding::Br) => &mut explicit[1],
                        Some(Coding::Zstd) => &mut explicit[2],
                        None => continue,
                    }
                };
                // A name listed twice keeps its highest weight.
                *slot = Some(slot.map_or(q, |old: u16| old.max(q)));
            }
        }
        if !present {
            return Accepted::default();
        }
        // Identity is acceptable unless excluded, but only preferred when the client weighs it.
        let identity_q = identity.or(star);
        let mut best: Option<(Coding, u16)> = None;
        for &coding in &self.codings {
            let index = match coding {
                Coding::Gzip => 0,
                Coding::Br => 1,
                Coding::Zstd => 2,
            };
            let q = explicit[index].or(star).unwrap_or(0);
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((coding, q));
            }
        }
        Accepted {
            // A client that weighs identity above every coding gets identity.
            coding: best
                .filter(|&(_, q)| identity_q.is_none_or(|i| q >= i))
                .map(|(c, _)| c),
            identity_refused: identity_q == Some(0),
        }
    }

    fn compressible_type(&self, headers: &HeaderMap) -> bool {
        let Some(media) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // Compared without lower-casing a copy: this runs on every response.
        let media = media.split(';').next().unwrap_or("").trim().as_bytes();
        self.content_types.iter().any(|t| {
            let t = t.as_bytes();
            if t.ends_with(b"/") {
                media.len() > t.len() && media[..t.len()].eq_ignore_ascii_case(t)
            } else {
                media.eq_ignore_ascii_case(t)
            }
        })
    }

    /// What to do with a response of these headers and (known) body size.
    fn plan(&self, accepted: Accepted, headers: &HeaderMap, size: Option<u64>) -> Plan {
        let encoded = headers
            .get(CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded
            || headers.contains_key(CONTENT_RANGE)
            || no_transform(headers)
            || !self.compressible_type(headers)
        {
            return Plan::Untouched;
        }
        match accepted.coding {
            Some(_) if size.is_some_and(|n| n < self.min_size) && !accepted.identity_refused => {
                Plan::Vary
            }
            Some(coding) => Plan::Compress(coding),
            None => Plan::Vary,
        }
    }

    /// The response as `accepted` asks for it: compressed, or untouched (see the module
    /// comment for what is never compressed).
    pub fn apply(&self, accepted: Accepted, resp: Response) -> Response {
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            return self.not_modified(accepted, resp);
        }
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::PARTIAL_CONTENT
        {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        let size = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| http_body::Body::size_hint(&body).exact());
        let coding = match self.plan(accepted, &parts.headers, size) {
            Plan::Untouched => return Response::from_parts(parts, body),
            Plan::Vary => {
                add_vary(&mut parts.headers);
                return Response::from_parts(parts, body);
            }
            Plan::Compress(coding) => coding,
        };
        add_vary(&mut parts.headers);
        weaken_etag(&mut parts.headers);
        parts.headers.remove(CONTENT_LENGTH);
        parts.headers.remove(ACCEPT_RANGES);
        parts.headers.insert(CONTENT_ENCODING, coding.header());
        let encoder = Encoder::new(coding, coding.level(self.level));
        let body = Body::new(Compressed {
            inner: body,
            encoder,
            unflushed: false,
            state: State::Streaming,
        });
        Response::from_parts(parts, body)
    }

    /// A 304 says what the 200 would have said about caching: the same `Vary`, and the
    /// same (weak, when compressed) `ETag`, or a cache in front could not match it to the
    /// response it stored. Decided from the [`Selected`] the 304 was made from.
    fn not_modified(&self, accepted: Accepted, mut resp: Response) -> Response {
        let Some(selected) = resp.extensions_mut().remove::<Selected>() else {
            return resp;
        };
        match self.plan(accepted, &selected.headers, Some(selected.size)) {
            Plan::Untouched => {}
            Plan::Vary => add_vary(resp.headers_mut()),
            Plan::Compress(_) => {
                add_vary(resp.headers_mut());
                weaken_etag(resp.headers_mut());
            }
        }
        resp
    }
}

enum Plan {
    Untouched,
    /// Not compressed for this client, but another one's answer could be.
    Vary,
    Compress(Coding),
}

/// On a 304: the headers and body size of the 200 it stands for (the compressor decides the
/// 304's `Vary` and `ETag` as it would have for the 200).
#[derive(Clone, Debug)]
pub struct Selected {
    pub headers: HeaderMap,
    pub size: u64,
}

/// Another representation: a strong validator of the identity body no longer names it byte
/// for byte (If-None-Match compares weakly, so revalidation still matches).
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                headers.insert(ETAG, weak);
            }
        }
    }
}

fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

fn add_vary(headers: &mut HeaderMap) {
    let varies = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| {
            let name = name.trim();
            name == "*" || name.eq_ignore_ascii_case("accept-encoding")
        });
    if !varies {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// One coding's encoder writing into memory. Writing to a `Vec` never waits, so each
/// operation completes in its first poll (`now_or_never`).
enum Encoder {
    Gzip(GzipEncoder<Vec<u8>>),
    /// Boxed: brotli's state is ~5.6 KB, the others' ~150 bytes.
    Br(Box<BrotliEncoder<Vec<u8>>>),
    Zstd(ZstdEncoder<Vec<u8>>),
}

fn done(result: Option<io::Result<()>>) -> io::Result<()> {
    result.unwrap_or_else(|| Err(io::Error::other("in-memory encoder would block")))
}

impl Encoder {
    fn new(coding: Coding, level: Level) -> Encoder {
        match coding {
            Coding::Gzip => Encoder::Gzip(GzipEncoder::with_quality(Vec::new(), level)),
            Coding::Br => Encoder::Br(Box::new(BrotliEncoder::with_quality(Vec::new(), level))),
            Coding::Zstd => Encoder::Zstd(ZstdEncoder::with_quality(Vec::new(), level)),
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        done(match self {
            Encoder::Gzip(e) => e.write_all(data).now_or_never(),
            Encoder::Br(e) => e.write_all(data).now_or_never(),
            Encoder::Zstd(e) => e.write_all(data).now_or_never(),
        })
    }

    /// Emits everything written so far as complete compressed blocks.
    fn flush(&mut self) -> io::Result<()> {
        done(match self {
            Encoder::Gzip(e) => e.flush().now_or_never(),
            Encoder::Br(e) => e.flush().now_or_never(),
            Encoder::Zstd(e) => e.flush().now_or_never(),
        })
    }

    /// Ends the stream (the coding's trailer).
    fn finish(&mut self) -> io::Result<()> {
        done(match self {
            Encoder::Gzip(e) => e.shutdown().now_or_never(),
            Encoder::Br(e) => e.shutdown().now_or_never(),
            Encoder::Zstd(e) => e.shutdown().now_or_never(),
        })
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let out = self.output();
        (!out.is_empty()).then(|| Bytes::from(std::mem::take(out)))
    }
}

enum State {
    Streaming,
    /// The body ended with trailers, sent after the coding's last bytes.
    Trailers(HeaderMap),
    Done,
}

pin_project_lite::pin_project! {
    /// The response body, compressed as it arrives.
    struct Compressed {
        #[pin]
        inner: Body,
        encoder: Encoder,
        // Data written since the last flush.
        unflushed: bool,
        state: State,
    }
}

impl http_body::Body for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            match std::mem::replace(this.state, State::Done) {
                State::Done => return Poll::Ready(None),
                State::Trailers(trailers) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                State::Streaming => *this.state = State::Streaming,
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.encoder.write(&data)?;
                        *this.unflushed = true;
                        if this.encoder.output().len() >= EMIT_AT {
                            if let Some(out) = this.encoder.take() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                    }
                    Err(frame) => {
                        this.encoder.finish()?;
                        *this.state = match frame.into_trailers() {
                            Ok(trailers) => State::Trailers(trailers),
                            Err(_) => State::Done,
                        };
                        if let Some(out) = this.encoder.take() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    this.encoder.finish()?;
                    *this.state = State::Done;
                    if let Some(out) = this.encoder.take() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Pending => {
                    // The upstream paused (an SSE event ended, a chunk is late): what it sent
                    // goes out now rather than waiting for more.
                    if *this.unflushed {
                        *this.unflushed = false;
                        this.encoder.flush()?;
                        if let Some(out) = this.encoder.take() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressor() -> Compressor {
        Compressor::new(&CompressionConfig::default())
    }

    fn accepted(value: &str) -> Accepted {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        compressor().accepted(&h)
    }

    #[test]
    fn negotiation_honours_weights_identity_and_unknown_codings() {
        let c = |coding| Accepted {
            coding,
            identity_refused: false,
        };
        assert_eq!(compressor().accepted(&HeaderMap::new()), c(None));
        assert_eq!(accepted(""), c(None));
        assert_eq!(accepted("gzip"), c(Some(Coding::Gzip)));
        assert_eq!(accepted("x-gzip"), c(Some(Coding::Gzip)));
        // Equal weights: the gateway's order (gzip, br, zstd by default).
        assert_eq!(accepted("zstd, br, gzip"), c(Some(Coding::Gzip)));
        assert_eq!(
            accepted("gzip;q=0.5, br;q=0.9, zstd;q=0.1"),
            c(Some(Coding::Br))
        );
        assert_eq!(accepted("gzip;q=0, br"), c(Some(Coding::Br)));
        assert_eq!(accepted("GZIP;Q=1.0"), c(Some(Coding::Gzip)));
        assert_eq!(accepted("compress, deflate, lz4"), c(None));
        assert_eq!(accepted("*"), c(Some(Coding::Gzip)));
        assert_eq!(accepted("*;q=0.5, gzip;q=0"), c(Some(Coding::Br)));
        // Malformed weights are ignored, not read as 1.
        assert_eq!(accepted("gzip;q=2, br;q=abc"), c(None));
        // Identity preferred over the codings offered.
        assert_eq!(accepted("gzip;q=0.5, identity"), c(None));
        assert_eq!(accepted("gzip;q=0.2, br;q=0.8"), c(Some(Coding::Br)));
        assert_eq!(
            accepted("gzip, identity;q=0"),
            Accepted {
                coding: Some(Coding::Gzip),
                identity_refused: true
            }
        );
        assert_eq!(
            accepted("*;q=0"),
            Accepted {
                coding: None,
                identity_refused: true
            }
        );
    }
}
