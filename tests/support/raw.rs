//! Raw HTTP/1.1 over a tokio `TcpStream`, for requests no client library would send
//! (malformed heads, smuggling attempts, byte-at-a-time writes). Every read is bounded.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any raw read waits before the test gives up on the gateway.
pub const READ_LIMIT: Duration = Duration::from_secs(10);

/// A parsed response head plus whatever body bytes arrived.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `bytes` on a fresh connection, half-closes nothing, and reads until the server
/// closes or `READ_LIMIT` passes. Returns every response found (pipelining).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<RawResponse> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A server may answer and close before reading everything (431, 413): ignore EPIPE.
    let _ = s.write_all(bytes).await;
    let data = read_until_close(&mut s, READ_LIMIT).await;
    parse_all(&data)
}

/// Status of the first response to `bytes` (0 when the server closed without answering).
pub async fn status_of(addr: SocketAddr, bytes: &[u8]) -> u16 {
    exchange(addr, bytes).await.first().map_or(0, |r| r.status)
}

/// Reads until EOF, an error, or `limit`.
pub async fn read_until_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
        }
    }
    data
}

/// Reads one complete response (Content-Length framed or head-only) within `limit`.
pub async fn read_response(s: &mut TcpStream, limit: Duration) -> Option<RawResponse> {
    let deadline = Instant::now() + limit;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some((resp, _)) = parse_one(&data) {
            return Some(resp);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return parse_one(&data).map(|(r, _)| r),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// True when the server closes the connection within `limit` (EOF or reset).
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn parse_one(data: &[u8]) -> Option<(RawResponse, usize)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut resp = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    if (100..200).contains(&status) {
        return Some((resp, end));
    }
    let len = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    match len {
        Some(len) if data.len() >= end + len => {
            resp.body = data[end..end + len].to_vec();
            Some((resp, end + len))
        }
        Some(_) => None,
        // Chunked or close-delimited: hand back what arrived.
        None => {
            resp.body = data[end..].to_vec();
            Some((resp, data.len()))
        }
    }
}

fn parse_all(mut data: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    // Bounded: each step consumes at least one head.
    while let Some((resp, used)) = parse_one(data) {
        out.push(resp);
        data = &data[used..];
    }
    out
}
