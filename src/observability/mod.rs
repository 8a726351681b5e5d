//! What the gateway tells operators: one JSON access-log line per request, the process's
//! JSON log, Prometheus metrics, and traces.
//!
//! Where to start reading: [`access::access`], the outermost middleware of the public
//! listener (request id, panic -> 500, the access-log line and the request metrics, with one
//! clock read per request), then [`catalog`] for every metric family the gateway exports.
//!
//! - [`access`]: the outermost middleware, and the route labels it records under (the
//!   route's template, never the raw path: bounded cardinality).
//! - [`metrics`]: the one Prometheus recorder per process, the `/metrics` text, static labels
//!   for methods and statuses, and `with_kept`, the one way to keep metric handles.
//! - [`catalog`]: every family with its help text, described at install and registered at
//!   zero when a configuration loads, so the first scrape shows them all.
//! - [`trace`]: W3C trace context: `traceparent` continued from the client or started here,
//!   and passed on to the upstream.
//! - [`otlp`]: optional span export over OTLP/HTTP (`[tracing] otlp_endpoint`): the request's
//!   span and one per upstream attempt.
//! - [`lag`]: the runtime's scheduling delay (how late a 10 ms tick wakes), the signal of a
//!   saturated or CPU-starved process for shedding, readiness and the metric.
//! - [`alive`]: what is alive in the process (configuration states, pipelines, runtime
//!   tasks, the heap held against the heap freed), read at each scrape: a leak or the
//!   allocator, where resident memory alone cannot tell.
//! - this file: the JSON log subscriber ([`init_logging`], `RUST_LOG`) and its batched
//!   stdout writer ([`BufferedStdout`], [`flush_logs`]), so a request's log line costs no
//!   `write(2)` of its own.
pub mod access;
pub mod alive;
pub mod catalog;
pub mod lag;
pub mod metrics;
pub mod otlp;
pub mod trace;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Installs the JSON log subscriber (`RUST_LOG`, default `info`). Safe to call twice.
///
/// Lines go to stdout through [`BufferedStdout`]: one `write(2)` per batch instead of one
/// per line (the access log writes a line per request), made by a thread of its own.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(BufferedStdout)
        .try_init();
}

/// Writes what is buffered to stdout now (before exiting).
pub fn flush_logs() {
    let log = log_buffer();
    let _writing = log.writing.lock().unwrap_or_else(|p| p.into_inner());
    let batch = take(&log.pending);
    write_out(&batch);
}

/// A batch is handed to the writer thread once it reaches this size...
const FLUSH_BYTES: usize = 32 * 1024;
/// ...or, when traffic is light, at most this long after its first line (as nginx's
/// `access_log ... buffer= flush=`): a line is never held back longer than this.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// If stdout stalls (a slow disk, a full pipe) the buffer may grow to this; past it the
/// logging thread writes itself, so logs slow requests down rather than eat memory.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// Lines not yet written, and the writer thread's wake-up call.
struct LogBuffer {
    pending: Mutex<Vec<u8>>,
    /// Held while writing, so batches reach stdout in order.
    writing: Mutex<()>,
    wake: Condvar,
    /// Set once a full batch has asked the writer to wake, cleared when it takes the batch:
    /// the lines appended until the writer runs (it may share the core) do not each make a
    /// `futex` call.
    woken: AtomicBool,
}

static LOG_BUFFER: OnceLock<LogBuffer> = OnceLock::new();

fn log_buffer() -> &'static LogBuffer {
    LOG_BUFFER.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(writer_thread)
            .ok();
        LogBuffer {
            pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
            writing: Mutex::new(()),
            wake: Condvar::new(),
            woken: AtomicBool::new(false),
        }
    })
}

/// Writes batches off the request path: the runtime thread only appends to memory, so a
/// slow `write(2)` (disk, pipe) never stalls the requests it is serving.
fn writer_thread() {
    let log = log_buffer();
    loop {
        {
            let pending = log.pending.lock().unwrap_or_else(|p| p.into_inner());
            let _ = log
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| p.len() < FLUSH_BYTES);
        }
        flush_logs();
    }
}

fn take(pending: &Mutex<Vec<u8>>) -> Vec<u8> {
    // A panic while holding the lock leaves at worst a partial line: keep logging.
    let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
    log_buffer().woken.store(false, Ordering::Relaxed);
    std::mem::replace(&mut *pending, Vec::with_capacity(FLUSH_BYTES))
}

fn write_out(batch: &[u8]) {
    if batch.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(batch);
    let _ = out.flush();
}

/// The log writer: each event's bytes are appended to a shared buffer that the writer
/// thread empties to stdout when it is full, every [`FLUSH_EVERY`], and at [`flush_logs`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BufferedStdout;

impl Write for BufferedStdout {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let log = log_buffer();
        let (len, first_full) = {
            let mut pending = log.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.extend_from_slice(bytes);
            let len = pending.len();
            // Under the lock `take` clears the flag in: one wake-up per batch.
            (
                len,
                len >= FLUSH_BYTES && !log.woken.swap(true, Ordering::Relaxed),
            )
        };
        if len >= MAX_PENDING {
            flush_logs();
        } else if first_full {
            log.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStdout {
    type Writer = BufferedStdout;

    fn make_writer(&'a self) -> Self::Writer {
        BufferedStdout
    }
}
