//! The breaker's part of an attempt (`upstream/attempt.rs`): asks the breaker before every
//! attempt (fast refusal while open) and leaves the recording to the end of the call.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::state::{Breaker, Permit};

/// The breaker's permit for one call, kept in the call's `Extensions` across its attempts
/// (an `Arc`, so a hedged attempt's copy shares it) and recorded once when the call ends.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallPermit(Arc<Mutex<Option<Permit>>>);

impl CallPermit {
    fn slot(&self) -> MutexGuard<'_, Option<Permit>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks `breaker` whether this attempt may go (a fast refusal while it is open). The
    /// permit of the call's first admitted attempt stays here, and [`Pipeline::send`] records
    /// ONE outcome per client call once the retry layer is done: a call that a retry saved is
    /// not an upstream failure as far as the breaker is concerned. Counting attempts instead
    /// would turn a partial brownout into a full outage: with a share `p` of attempts
    /// failing, `N` failures in a row come every ~1/p^N attempts, while `N` failed calls in a
    /// row need `N * (max_retries + 1)` failed attempts.
    ///
    /// [`Pipeline::send`]: crate::upstream::pipeline::Pipeline::send
    pub(crate) fn admit(&self, breaker: &Arc<Breaker>) -> reqwest_middleware::Result<()> {
        breaker
            .admit_attempt(&mut self.slot())
            .map_err(reqwest_middleware::Error::middleware)
    }

    /// Records the call's final outcome with the breaker: `failed` as for
    /// `Outcome::breaker_failure`; `None` records nothing (and frees a probe slot).
    pub(crate) fn finish(&self, failed: Option<bool>) {
        let permit = self.slot().take();
        if let (Some(permit), Some(failed)) = (permit, failed) {
            permit.record(failed);
        }
    }
}
