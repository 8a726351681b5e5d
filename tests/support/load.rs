//! Open-model load for the overload tests: a fixed arrival rate, each request on its own task
//! whatever the others are doing (clients at market open do not wait for each other).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use super::gateway::client;

/// One answer as a client saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The JSON error body's `reason`, if any.
    pub reason: Option<String>,
    pub retry_after: Option<String>,
    pub took: Duration,
    /// When it was sent, from the start of its offer (zero for a single `fetch`).
    pub sent: Duration,
}

/// One GET of `url`.
pub async fn fetch(c: &reqwest::Client, url: &str) -> Answer {
    let started = Instant::now();
    let response = c.get(url).send().await.expect("the gateway answers");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        reason: body["reason"].as_str().map(str::to_owned),
        retry_after,
        took: started.elapsed(),
        sent: Duration::ZERO,
    }
}

/// `rate` requests per second to `url` for `for_how_long`; every answer.
pub async fn offer(url: &str, rate: u32, for_how_long: Duration) -> Vec<Answer> {
    let c = client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < for_how_long {
        tick.tick().await;
        let (c, url) = (c.clone(), url.to_string());
        let sent = started.elapsed();
        tasks.push(tokio::spawn(async move {
            Answer {
                sent,
                ..fetch(&c, &url).await
            }
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("request task"));
    }
    answers
}
