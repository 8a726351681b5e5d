//! JSON logging, the per-request access log / request id / panic guard, and metrics.
pub mod access;
pub mod metrics;

use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Installs the JSON log subscriber (`RUST_LOG`, default `info`). Safe to call twice.
///
/// Lines go to stdout through [`BufferedStdout`]: one `write(2)` per batch instead of one
/// per line (the access log writes a line per request).
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
    flush(&mut log_buffer());
}

/// A batch is written once it reaches this size...
const FLUSH_BYTES: usize = 32 * 1024;
/// ...or, when traffic is light, at most this long after its first line (as nginx's
/// `access_log ... buffer= flush=`): a line is never held back longer than this.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

static LOG_BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn log_buffer() -> MutexGuard<'static, Vec<u8>> {
    let buffer = LOG_BUFFER.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                flush_logs();
            })
            .ok();
        Mutex::new(Vec::with_capacity(FLUSH_BYTES))
    });
    // A panic while holding the lock leaves at worst a partial line: keep logging.
    buffer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn flush(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(buffer);
    let _ = out.flush();
    buffer.clear();
}

/// The log writer: each event's bytes are appended to a shared buffer that is written to
/// stdout when full, by a timer thread, or by [`flush_logs`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BufferedStdout;

impl Write for BufferedStdout {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = log_buffer();
        buffer.extend_from_slice(bytes);
        if buffer.len() >= FLUSH_BYTES {
            flush(&mut buffer);
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
