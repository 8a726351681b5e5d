//! An upstream body of unknown length (chunked, Server-Sent Events) read by its own task, at
//! the upstream's speed, into a buffer of at most `limits.response_buffer` bytes, and handed to
//! the client chunk by chunk as it arrives.
//!
//! Why a task: the client side of a response is only polled when the client can take more
//! (an HTTP/2 stream whose peer grants no flow-control window is never polled again after its
//! first chunk). Reading the upstream from the client's poll would make the upstream wait for
//! the slowest client, holding its slot and connection; the task keeps reading while the
//! client does not, so a body that fits the buffer ends the call (slot and pooled connection
//! released) whatever the client does. A body larger than the buffer makes the task wait for
//! the client (the buffer bounds memory, not time: `limits.min_send_rate` and `send_timeout`
//! bound the time on the client's side). A client that goes away ends the task at once, which
//! drops the upstream connection mid-body (it cannot be reused) and frees the slot.
//!
//! Chunks are passed on as they come, never gathered: an event stream flows event by event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Semaphore};

use crate::upstream::bulkhead::Slot;

type Item = Result<Frame<Bytes>, reqwest::Error>;

/// The client's side: the chunks the task has read, in order, then the end (or the
/// upstream's error).
pub struct ReadAhead {
    chunks: mpsc::UnboundedReceiver<Item>,
    /// Free bytes in the buffer, as permits: the task takes them for each chunk before
    /// queueing it, the client gives them back as it takes chunks. Closed when the client
    /// goes, which wakes a task waiting for room.
    room: Arc<Semaphore>,
    /// The buffer size, so a chunk larger than the whole buffer takes (and returns) all of it
    /// rather than waiting for room that can never exist.
    limit: usize,
}

impl ReadAhead {
    /// Starts reading `body` (whose call holds `slot`) into a buffer of `limit` (> 0) bytes.
    pub fn spawn(body: reqwest::Body, slot: Slot, limit: usize) -> ReadAhead {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let room = Arc::new(Semaphore::new(limit));
        let (tx, chunks) = mpsc::unbounded_channel();
        tokio::spawn(read(body, slot, tx, room.clone(), limit));
        ReadAhead {
            chunks,
            room,
            limit,
        }
    }
}

/// Buffer bytes a chunk takes.
fn weight(frame: &Frame<Bytes>, limit: usize) -> u32 {
    frame.data_ref().map_or(0, |d| d.len().min(limit)) as u32
}

/// The task: reads until the upstream ends or fails, or the client goes.
async fn read(
    mut body: reqwest::Body,
    slot: Slot,
    tx: mpsc::UnboundedSender<Item>,
    room: Arc<Semaphore>,
    limit: usize,
) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = tx.closed() => break,
        };
        match frame {
            // The end: dropping `tx` (after what was queued) ends the client's body.
            None => break,
            Some(Err(e)) => {
                let _ = tx.send(Err(e));
                break;
            }
            Some(Ok(frame)) => {
                // Waits while the buffer is full; the client going closes `room`.
                match room.acquire_many(weight(&frame, limit)).await {
                    Ok(permits) => permits.forget(),
                    Err(_) => break,
                }
                if tx.send(Ok(frame)).is_err() {
                    break;
                }
            }
        }
    }
    // Explicit for the reader: the upstream is done (or abandoned), its slot goes now.
    drop(slot);
}

impl http_body::Body for ReadAhead {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, reqwest::Error>>> {
        let polled = self.chunks.poll_recv(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.room.add_permits(weight(frame, self.limit) as usize);
        }
        polled
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // A task waiting for room stops at once (it also sees the channel close).
        self.room.close();
    }
}
