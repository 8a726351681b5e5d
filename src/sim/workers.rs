//! A fixed number of workers in front of a simulated service, with a FIFO backlog: the
//! capacity fault of `/_faults` (`workers`, `backlog`).
//!
//! This is how the Python services run under gunicorn's sync workers: N requests are served
//! at once, each holding its worker for its whole service time; the rest wait in the listen
//! backlog in arrival order. Capacity is then N / service time (16 workers x 200 ms = 80
//! req/s), and demand above it grows the backlog, which is the overload the gateway must
//! handle. A request already in the backlog is served even if its client has given up:
//! the caller keeps its place by running the request on a task of its own (see `faults.rs`).
//!
//! Beyond the optional `backlog` bound a request is refused at once ([`BacklogFull`]); the
//! middleware answers it with a 503. A full kernel listen queue drops the connection attempt
//! instead, but a sim answers on connections that are already open (keep-alive), and a
//! prompt 503 is easy to count from outside.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::oneshot;

/// The backlog bound was reached: the request is refused without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("backlog full")]
pub struct BacklogFull;

/// What `GET /_faults` shows of the pool: live occupancy and totals since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolState {
    /// Requests holding a worker right now (with no worker limit: every request in service).
    pub busy: usize,
    /// Requests waiting in the backlog for a worker.
    pub queued: usize,
    /// Requests that held a worker and finished (served or failed by a fault).
    pub served: u64,
    /// Requests refused because the backlog was full.
    pub refused: u64,
}

/// Shared handle on one service's workers.
#[derive(Clone, Debug, Default)]
pub struct WorkerPool {
    inner: Arc<Mutex<Pool>>,
}

#[derive(Debug, Default)]
struct Pool {
    /// Workers; `None` = unlimited (no capacity fault).
    limit: Option<usize>,
    /// Waiting requests beyond which new ones are refused; `None` = unbounded.
    backlog: Option<usize>,
    busy: usize,
    /// Waiters in arrival order, each with the id its ticket uses to leave the line.
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
    next_id: u64,
    served: u64,
    refused: u64,
    /// Set on shutdown: the backlog is let through so the server's drain is not held up.
    draining: bool,
}

impl Pool {
    fn has_free_worker(&self) -> bool {
        self.draining || self.limit.is_none_or(|limit| self.busy < limit)
    }

    /// Hands free workers to the oldest waiters. A grant is made under the lock and the
    /// waiter's ticket checks under the same lock, so no grant is ever lost.
    fn dispatch(&mut self) {
        while self.has_free_worker() {
            let Some((_, grant)) = self.queue.pop_front() else {
                return;
            };
            self.busy += 1;
            if grant.send(()).is_err() {
                // The ticket is gone without having left the line: cannot happen while
                // tickets remove themselves on drop, but a lost worker must not be the result.
                self.busy -= 1;
            }
        }
    }
}

impl WorkerPool {
    /// Sets the number of workers (0 = unlimited) and the backlog bound. Takes effect at
    /// once: more workers serve waiting requests now; fewer let the busy ones finish.
    pub fn configure(&self, workers: u32, backlog: Option<u32>) {
        let mut pool = self.lock();
        pool.limit = (workers > 0).then_some(workers as usize);
        pool.backlog = backlog.map(|b| b as usize);
        pool.dispatch();
    }

    /// Lets every waiting request through, now and from now on (server shutdown).
    pub fn drain(&self) {
        let mut pool = self.lock();
        pool.draining = true;
        pool.dispatch();
    }

    pub fn state(&self) -> PoolState {
        let pool = self.lock();
        PoolState {
            busy: pool.busy,
            queued: pool.queue.len(),
            served: pool.served,
            refused: pool.refused,
        }
    }

    /// Takes a place in line now (arrival order is decided here, not when the ticket is
    /// awaited), or refuses when the backlog is full.
    pub fn enter(&self) -> Result<Ticket, BacklogFull> {
        let mut pool = self.lock();
        // Nobody overtakes a waiter: a free worker with a non-empty queue is about to be
        // handed to the queue's head by `dispatch`.
        if pool.queue.is_empty() && pool.has_free_worker() {
            pool.busy += 1;
            return Ok(Ticket {
                pool: self.clone(),
                place: Place::Granted,
            });
        }
        if pool.backlog.is_some_and(|bound| pool.queue.len() >= bound) {
            pool.refused += 1;
            return Err(BacklogFull);
        }
        let id = pool.next_id;
        pool.next_id += 1;
        let (grant, granted) = oneshot::channel();
        pool.queue.push_back((id, grant));
        Ok(Ticket {
            pool: self.clone(),
            place: Place::Waiting(id, granted),
        })
    }

    /// Gives a worker back; `served` says whether a request was served with it (a worker
    /// granted to a ticket that was then dropped served nobody).
    fn release(&self, served: bool) {
        let mut pool = self.lock();
        pool.busy = pool.busy.saturating_sub(1);
        if served {
            pool.served += 1;
        }
        pool.dispatch();
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The state stays consistent even if a holder panicked: every update is a few field
        // writes with no await in between.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A place in line for a worker; await [`Ticket::worker`] to get it.
#[derive(Debug)]
pub struct Ticket {
    pool: WorkerPool,
    place: Place,
}

#[derive(Debug)]
enum Place {
    /// A worker was free on arrival and is counted as busy already.
    Granted,
    /// In the queue under this id; the grant arrives on the receiver.
    Waiting(u64, oneshot::Receiver<()>),
    /// The worker was handed to a [`Worker`], which releases it.
    TakenUp,
}

impl Ticket {
    /// Waits for this request's turn (FIFO) and returns its worker, held until dropped.
    pub async fn worker(mut self) -> Worker {
        if let Place::Waiting(_, granted) = &mut self.place {
            // The sender lives in the queue until it grants: an error would mean the pool was
            // dropped, which cannot happen while this ticket holds it.
            let _ = granted.await;
        }
        self.place = Place::TakenUp;
        Worker {
            pool: self.pool.clone(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.place, Place::TakenUp) {
            Place::TakenUp => {}
            // Granted on arrival but never used: the worker goes to the next in line.
            Place::Granted => self.pool.release(false),
            Place::Waiting(id, mut granted) => {
                let mut pool = self.pool.lock();
                let before = pool.queue.len();
                pool.queue.retain(|(waiter, _)| *waiter != id);
                // Not in the queue any more means granted (grants happen under this lock):
                // that worker must not be lost either.
                let was_granted = pool.queue.len() == before && granted.try_recv().is_ok();
                drop(pool);
                if was_granted {
                    self.pool.release(false);
                }
            }
        }
    }
}

/// A worker held for one request's service time; released (to the next in line) on drop.
#[derive(Debug)]
pub struct Worker {
    pool: WorkerPool,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.pool.release(true);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    /// Serves one request: waits for a worker, holds it for `service`.
    async fn serve(pool: WorkerPool, service: Duration) -> Result<Instant, BacklogFull> {
        let ticket = pool.enter()?;
        let _worker = ticket.worker().await;
        tokio::time::sleep(service).await;
        Ok(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn two_workers_serve_six_requests_in_three_waves_in_arrival_order() {
        let pool = WorkerPool::default();
        pool.configure(2, None);
        let start = Instant::now();
        let mut served = Vec::new();
        for _ in 0..6 {
            served.push(tokio::spawn(serve(
                pool.clone(),
                Duration::from_millis(200),
            )));
        }
        tokio::task::yield_now().await;
        assert_eq!(
            pool.state(),
            PoolState {
                busy: 2,
                queued: 4,
                served: 0,
                refused: 0
            }
        );
        let mut finished = Vec::new();
        for task in served {
            let at = task.await.expect("task").expect("admitted");
            finished.push((at - start).as_millis());
        }
        // Spawned in order 0..6: FIFO means request i finishes in wave i / 2.
        assert_eq!(finished, [200, 200, 400, 400, 600, 600]);
        assert_eq!(pool.state().served, 6);
        assert_eq!(pool.state().busy, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_backlog_refuses_at_once_and_counts_it() {
        let pool = WorkerPool::default();
        pool.configure(1, Some(1));
        let first = tokio::spawn(serve(pool.clone(), Duration::from_secs(1)));
        let second = tokio::spawn(serve(pool.clone(), Duration::from_secs(1)));
        tokio::task::yield_now().await;
        assert_eq!(serve(pool.clone(), Duration::ZERO).await, Err(BacklogFull));
        let state = pool.state();
        assert_eq!((state.busy, state.queued, state.refused), (1, 1, 1));
        assert!(first.await.expect("task").is_ok());
        assert!(second.await.expect("task").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn more_workers_or_none_release_the_backlog_at_once() {
        let pool = WorkerPool::default();
        pool.configure(1, None);
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| tokio::spawn(serve(pool.clone(), Duration::from_millis(100))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(pool.state().queued, 3);
        pool.configure(0, None);
        assert_eq!((pool.state().busy, pool.state().queued), (4, 0));
        for task in tasks {
            let at = task.await.expect("task").expect("admitted");
            assert_eq!((at - start).as_millis(), 100);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fewer_workers_let_the_busy_finish_and_then_hold_to_the_new_limit() {
        let pool = WorkerPool::default();
        pool.configure(3, None);
        for _ in 0..3 {
            tokio::spawn(serve(pool.clone(), Duration::from_millis(100)));
        }
        tokio::task::yield_now().await;
        pool.configure(1, None);
        assert_eq!(pool.state().busy, 3, "no request is preempted");
        let late: Vec<_> = (0..2)
            .map(|_| tokio::spawn(serve(pool.clone(), Duration::from_millis(100))))
            .collect();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!((pool.state().busy, pool.state().queued), (1, 1));
        for task in late {
            task.await.expect("task").expect("admitted");
        }
        assert_eq!(pool.state().served, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_the_line_gives_up_its_place_and_loses_no_worker() {
        let pool = WorkerPool::default();
        pool.configure(1, None);
        let holder = tokio::spawn(serve(pool.clone(), Duration::from_millis(100)));
        tokio::task::yield_now().await;
        let quitter = tokio::spawn(serve(pool.clone(), Duration::from_millis(100)));
        tokio::task::yield_now().await;
        assert_eq!(pool.state().queued, 1);
        quitter.abort();
        let _ = quitter.await;
        assert_eq!(pool.state().queued, 0);
        holder.await.expect("task").expect("admitted");
        // The worker is free again: a new request is served at once.
        let start = Instant::now();
        let at = serve(pool.clone(), Duration::from_millis(10))
            .await
            .expect("admitted");
        assert_eq!((at - start).as_millis(), 10);
        assert_eq!(pool.state().busy, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_lets_the_backlog_through() {
        let pool = WorkerPool::default();
        pool.configure(1, None);
        for _ in 0..3 {
            tokio::spawn(serve(pool.clone(), Duration::from_secs(10)));
        }
        tokio::task::yield_now().await;
        assert_eq!(pool.state().queued, 2);
        pool.drain();
        assert_eq!((pool.state().busy, pool.state().queued), (3, 0));
    }
}
