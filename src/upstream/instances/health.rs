//! Passive health: each instance's attempts are counted against the ejection trip rule
//! (`upstream/trip.rs`: `consecutive_failures` in a row, or a failure rate over a window);
//! a tripped instance is ejected for a time that doubles with each re-ejection
//! (`upstream/backoff.rs`), never more than `max_ejected_percent` of the set at once. An
//! instance whose attempt failed (503 and other 5xx, refused, reset, timed out) or that
//! answered 429 is also passed over for `bias_duration` while others can serve (linkerd's
//! load biaser idea): a fast error must not look like a fast instance.
//!
//! With `breaker.probe_path`, an ejected instance returns only once its probe passes (the
//! discovery task asks); without, when its time is over.
//!
//! This file is one instance's [`Health`]; the rules that need the whole set (at most
//! `max_ejected_percent` out, which instances serve) are `InstanceSet`'s, in `mod.rs`.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::EjectionConfig;
use crate::upstream::backoff::Backoff;
use crate::upstream::call::{instant_after, Outcome};
use crate::upstream::trip::Tripwire;

/// An instance's health and history, behind one short lock.
#[derive(Clone, Debug)]
pub(crate) struct Health {
    /// Its attempts against the ejection trip rule.
    trip: Tripwire,
    /// Out of rotation until then.
    pub(crate) ejected_until: Option<Instant>,
    /// The next ejection's length: doubles per re-ejection, from `base_time`.
    ejection_time: Backoff,
    /// A return longer ago than this (`max_time`) starts the doubling afresh.
    forget_after: Duration,
    /// When the last ejection ended, to start the doubling afresh after a long healthy spell.
    returned_at: Option<Instant>,
    /// Passed over (429/503) until then.
    pub(crate) biased_until: Option<Instant>,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
}

impl Health {
    pub(crate) fn new(ejection: &EjectionConfig) -> Health {
        Health {
            trip: Tripwire::new(ejection.trip_rule()),
            ejected_until: None,
            ejection_time: Backoff::new(ejection.ejection_time()),
            forget_after: ejection.max_time.0,
            returned_at: None,
            biased_until: None,
            successes: 0,
            failures: 0,
        }
    }

    /// Learns from one attempt's outcome at `now`: counts it against the trip rule, and
    /// passes the instance over for `bias` after a failure or a 429. `true` when the rule
    /// tripped and the instance is not ejected already: eject it, if the set allows.
    pub(crate) fn record(&mut self, now: Instant, outcome: Outcome, bias: Duration) -> bool {
        let (verdict, biased) = verdict(outcome);
        let tripped = match verdict {
            Verdict::Neutral => return false,
            Verdict::Success => {
                self.successes += 1;
                self.trip.record(now, false)
            }
            Verdict::Failure => {
                self.failures += 1;
                self.trip.record(now, true)
            }
        };
        if biased {
            self.biased_until = Some(instant_after(now, bias));
        }
        tripped && self.ejected_until.is_none()
    }

    /// Whether the instance may serve at `now` as far as its health goes: not while ejected
    /// (an ejection that ran out ends here, unless the instance has a probe: then only a
    /// passing probe ends it, so real requests never rediscover a dead instance); passed over
    /// after a failure or 429 unless `biased_ok`.
    pub(crate) fn availability(
        &mut self,
        now: Instant,
        has_probe: bool,
        biased_ok: bool,
    ) -> Availability {
        if let Some(until) = self.ejected_until {
            if now < until || has_probe {
                return Availability::No;
            }
            self.end_ejection(now);
            return Availability::Returned;
        }
        match self.biased_until {
            Some(until) if now < until && !biased_ok => Availability::Biased,
            _ => Availability::Yes,
        }
    }

    /// Back in rotation with a clean slate (its time ran out, or its probe passed); the
    /// doubling of the next ejection counts from `now`.
    pub(crate) fn end_ejection(&mut self, now: Instant) {
        self.ejected_until = None;
        self.biased_until = None;
        self.trip.reset();
        self.returned_at = Some(now);
    }

    /// Takes over `old`'s state (a reload rebuilt the instance): an ejection or a pass-over
    /// runs on to the same moment, so a reload never puts a bad instance back in rotation.
    /// The history (trip counts, the ejection doubling) carries over only under the same
    /// ejection rules (`same_rules`); under new ones it starts afresh.
    pub(crate) fn inherit(&mut self, old: &Health, same_rules: bool) {
        if same_rules {
            *self = old.clone();
            return;
        }
        self.ejected_until = old.ejected_until;
        self.returned_at = old.returned_at;
        self.biased_until = old.biased_until;
        self.successes = old.successes;
        self.failures = old.failures;
    }

    /// Out of rotation from `now`; returns for how long.
    pub(crate) fn eject(&mut self, now: Instant) -> Duration {
        // A long healthy spell since the last return starts the doubling afresh.
        if self
            .returned_at
            .is_some_and(|r| now.saturating_duration_since(r) > self.forget_after)
        {
            self.ejection_time.reset();
        }
        let time = self.ejection_time.next();
        self.ejected_until = Some(instant_after(now, time));
        time
    }
}

/// Whether an instance may take an attempt now.
pub(crate) enum Availability {
    No,
    /// In rotation, but passed over while others can serve.
    Biased,
    Yes,
    /// Yes, and it just came back from an ejection (the gauges change).
    Returned,
}

/// How one attempt's outcome counts for its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// Nothing to learn (our own error, a cancelled attempt).
    Neutral,
}

/// The verdict, and whether to pass the instance over for a while: after a failure (a fast
/// error must not look like a fast instance, and the next calls should not all land on it
/// while it collects the failures that eject it) and after a 429 (overloaded, not broken).
fn verdict(outcome: Outcome) -> (Verdict, bool) {
    let v = match outcome.breaker_failure() {
        Some(true) => Verdict::Failure,
        Some(false) => Verdict::Success,
        None => Verdict::Neutral,
    };
    let overloaded = matches!(outcome, Outcome::Status(s) if s.as_u16() == 429);
    (v, v == Verdict::Failure || overloaded)
}
