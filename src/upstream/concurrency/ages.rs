//! How long the calls holding slots have held them, without a lock: each counts itself in
//! the cohort of when it was admitted, a slot of a ring that moves on once a cohort has
//! lasted its tick (the first call admitted after that starts the next). Reading how many
//! were admitted before some time walks the ring; it is done only by a call that found the
//! limit full.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Duration;

use tokio::time::Instant;

/// Cohorts in the ring. With a tick of an eighth of the upstream's no-load round trip, the
/// oldest is four round trips old; calls older still are counted with the cohort that
/// reuses their slot (as younger than they are, which only ever makes a wait look less
/// hopeless than it is).
const COHORTS: usize = 32;
/// Cohorts per no-load round trip.
const COHORTS_PER_ROUND_TRIP: u32 = 8;
/// A cohort's length before any round trip is known.
const FIRST_TICK: Duration = Duration::from_millis(10);

pub(super) struct Ages {
    origin: Instant,
    /// The current cohort's number; its slot is the number modulo [`COHORTS`].
    current: AtomicU64,
    /// When each slot's cohort began, in microseconds after `origin`.
    began: [AtomicU64; COHORTS],
    /// Calls holding a slot in each slot's cohort.
    count: [AtomicUsize; COHORTS],
    /// How long a cohort lasts, in microseconds.
    tick: AtomicU64,
}

impl Ages {
    pub(super) fn new(now: Instant) -> Ages {
        Ages {
            origin: now,
            current: AtomicU64::new(0),
            began: Default::default(),
            count: Default::default(),
            tick: AtomicU64::new(micros(FIRST_TICK)),
        }
    }

    fn at(&self, now: Instant) -> u64 {
        micros(now.saturating_duration_since(self.origin))
    }

    /// Counts a call admitted now; returns its cohort's slot (for [`Ages::leave`]).
    pub(super) fn enter(&self, now: Instant) -> usize {
        let at = self.at(now);
        let mut current = self.current.load(SeqCst);
        let began = self.began[current as usize % COHORTS].load(Relaxed);
        if at.saturating_sub(began) >= self.tick.load(Relaxed) {
            // The cohort has lasted its tick: this call starts the next (or joins the one
            // another call just started).
            match self
                .current
                .compare_exchange(current, current + 1, SeqCst, SeqCst)
            {
                Ok(_) => {
                    current += 1;
                    self.began[current as usize % COHORTS].store(at, Relaxed);
                }
                Err(now_current) => current = now_current,
            }
        }
        let slot = current as usize % COHORTS;
        self.count[slot].fetch_add(1, Relaxed);
        slot
    }

    pub(super) fn leave(&self, slot: usize) {
        self.count[slot].fetch_sub(1, Relaxed);
    }

    /// How many calls holding a slot now were surely admitted at least `age` ago (a cohort
    /// counts when its youngest possible member is that old).
    pub(super) fn older_than(&self, now: Instant, age: Duration) -> usize {
        let at = self.at(now);
        let age = micros(age);
        let tick = self.tick.load(Relaxed);
        let current = self.current.load(SeqCst);
        let mut calls = 0;
        let mut next_began = at;
        for back in 0..COHORTS as u64 {
            let Some(cohort) = current.checked_sub(back) else {
                break;
            };
            let slot = cohort as usize % COHORTS;
            let began = self.began[slot].load(Relaxed);
            // Its youngest call was admitted before the next cohort began, and within a tick
            // of its own start.
            let youngest = next_began.min(began.saturating_add(tick));
            next_began = began;
            if at.saturating_sub(youngest) >= age {
                calls += self.count[slot].load(Relaxed);
            }
        }
        calls
    }

    /// Cohorts last an eighth of the no-load round trip.
    pub(super) fn set_round_trip(&self, round_trip: Duration) {
        let tick = micros(round_trip / COHORTS_PER_ROUND_TRIP).max(1_000);
        self.tick.store(tick, Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
