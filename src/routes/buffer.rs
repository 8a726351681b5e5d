//! Response bodies held for clients, so that an upstream is done with a call when IT is done,
//! not when the client has read the answer (nginx's proxy buffering, in memory only).
//!
//! Two bounds. Per response, `limits.response_buffer`: a body of known length up to it is read
//! whole ([`read_whole`]); a body of unknown length (chunked, an event stream) is read by a
//! task into a buffer that large ([`ReadAhead`]). In total, `limits.response_buffer_total`
//! ([`BufferBudget`]): every held byte is charged until the memory holding it is freed, which
//! is when the socket has taken it (hyper keeps a chunk in its write queue until then), so
//! slow readers cannot make the gateway hold more than that however many there are. With the
//! budget spent, a body is streamed instead, its upstream slot held until the client has it:
//! what every body did before buffering, bounded per client by `max_client_share`.
//!
//! Why a task for bodies of unknown length: the client side of a response is only polled when
//! the client can take more (an HTTP/2 stream whose peer grants no flow-control window is
//! never polled again after its first chunk). Reading the upstream from the client's poll
//! would make the upstream wait for the slowest client; the task keeps reading while the
//! client does not, so a body that fits ends the call whatever the client does. A larger body
//! makes the task wait for the client (the buffer bounds memory, not time:
//! `limits.min_send_rate` and `send_timeout` bound the time on the client's side). A client
//! that goes away ends the task at once, which drops the upstream connection mid-body (it
//! cannot be reused) and frees the slot. Chunks are passed on as they come, never gathered:
//! an event stream flows event by event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::upstream::bulkhead::Slot;

/// Bytes of response bodies held for clients, all responses together
/// (`limits.response_buffer_total`).
#[derive(Clone)]
pub struct BufferBudget(Arc<Semaphore>);

impl BufferBudget {
    pub fn new(total: u64) -> BufferBudget {
        let total = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BufferBudget(Arc::new(Semaphore::new(total)))
    }

    /// `n` bytes now, if the budget has them.
    fn try_take(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        self.0.clone().try_acquire_many_owned(n).ok()
    }

    /// `n` bytes, waiting for them.
    async fn take(&self, n: u32) -> Option<OwnedSemaphorePermit> {
        self.0.clone().acquire_many_owned(n).await.ok()
    }
}

/// `bytes`, charged to the budget until the last copy of them is freed.
fn charged(bytes: Bytes, permit: OwnedSemaphorePermit) -> Bytes {
    struct Charged {
        bytes: Bytes,
        _permit: OwnedSemaphorePermit,
    }
    impl AsRef<[u8]> for Charged {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    Bytes::from_owner(Charged {
        bytes,
        _permit: permit,
    })
}

/// What [`read_whole`] made of a body.
pub enum Whole {
    /// The whole body, charged to the budget.
    Read(Bytes),
    /// The budget has no room for it: the body, untouched, to be streamed.
    NoRoom(reqwest::Body),
}

/// Reads a body of `len` bytes (its declared length) whole, if the budget has room for it.
pub async fn read_whole(
    body: reqwest::Body,
    len: u64,
    budget: &BufferBudget,
) -> Result<Whole, reqwest::Error> {
    let Some(permit) = usize::try_from(len).ok().and_then(|n| budget.try_take(n)) else {
        return Ok(Whole::NoRoom(body));
    };
    let whole = body.collect().await?.to_bytes();
    Ok(Whole::Read(charged(whole, permit)))
}

type Item = Result<Frame<Bytes>, reqwest::Error>;

/// The client's side of a body read ahead by a task: the chunks the task has read, in order,
/// then the end (or the upstream's error).
pub struct ReadAhead {
    chunks: mpsc::UnboundedReceiver<Item>,
    /// Free bytes of this response's buffer, as permits: the task takes them for each chunk
    /// before queueing it, the client gives them back as it takes chunks. Closed when the
    /// client goes, which wakes a task waiting for room.
    room: Arc<Semaphore>,
    /// The buffer size, so a chunk larger than the whole buffer takes (and returns) all of it
    /// rather than waiting for room that can never exist.
    limit: usize,
}

impl ReadAhead {
    /// Starts reading `body` (whose call holds `slot`) into a buffer of `limit` (> 0) bytes,
    /// each chunk charged to `budget` until it is freed.
    pub fn spawn(body: reqwest::Body, slot: Slot, limit: usize, budget: BufferBudget) -> ReadAhead {
        let limit = limit.clamp(1, u32::MAX as usize);
        let room = Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS)));
        let (tx, chunks) = mpsc::unbounded_channel();
        tokio::spawn(read(body, slot, tx, room.clone(), limit, budget));
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
    budget: BufferBudget,
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
                let weight = weight(&frame, limit);
                // Waits while this response's buffer is full (the client going closes
                // `room`), then while the budget is spent: the upstream is then read only as
                // fast as the client takes, as if streamed.
                let permits = tokio::select! {
                    p = async { (room.acquire_many(weight).await, budget.take(weight).await) } => p,
                    _ = tx.closed() => break,
                };
                let charge = match permits {
                    (Ok(room_permit), Some(charge)) => {
                        room_permit.forget();
                        charge
                    }
                    _ => break,
                };
                let frame = match frame.into_data() {
                    Ok(data) => Frame::data(charged(data, charge)),
                    Err(trailers) => trailers,
                };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_are_charged_until_the_last_copy_is_freed() {
        let budget = BufferBudget::new(100);
        let permit = budget.try_take(60).unwrap();
        let held = charged(Bytes::from(vec![7u8; 60]), permit);
        assert!(budget.try_take(41).is_none(), "only 40 left");
        let copy = held.slice(10..20);
        drop(held);
        // A part still held (in hyper's write queue, say) keeps the whole charge.
        assert!(budget.try_take(41).is_none());
        assert_eq!(&copy[..], &[7u8; 10]);
        drop(copy);
        assert!(budget.try_take(100).is_some());
    }
}
