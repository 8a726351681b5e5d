//! Interim pass-through pipeline (per-attempt timeout only); replaced by the full
//! deadline -> retry -> breaker -> timeout composition.

use std::sync::Arc;
use std::time::Duration;

pub struct Pipeline {
    name: Arc<str>,
    client: reqwest::Client,
}

#[derive(Clone, Copy, Debug)]
pub struct CallOptions {
    pub deadline: Duration,
    pub attempt_timeout: Duration,
    pub idempotent: bool,
    pub retry_non_idempotent: bool,
    pub max_retries: Option<u32>,
}

pub struct Delivered {
    pub response: reqwest::Response,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unavailable after {attempts} attempt(s): {detail}")]
    Unavailable { attempts: u32, detail: String },
    #[error("upstream timed out after {attempts} attempt(s)")]
    Timeout { attempts: u32 },
    #[error("circuit open; next probe in {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
}

impl Pipeline {
    pub fn new(name: &str, client: reqwest::Client) -> Pipeline {
        Pipeline {
            name: Arc::from(name),
            client,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn send(
        &self,
        req: reqwest::Request,
        call: CallOptions,
    ) -> Result<Delivered, UpstreamError> {
        let limit = call.attempt_timeout.min(call.deadline);
        match tokio::time::timeout(limit, self.client.execute(req)).await {
            Ok(Ok(response)) => Ok(Delivered {
                response,
                attempts: 1,
            }),
            Ok(Err(e)) if e.is_timeout() => Err(UpstreamError::Timeout { attempts: 1 }),
            Ok(Err(e)) => Err(UpstreamError::Unavailable {
                attempts: 1,
                detail: e.to_string(),
            }),
            Err(_) => Err(UpstreamError::Timeout { attempts: 1 }),
        }
    }
}
