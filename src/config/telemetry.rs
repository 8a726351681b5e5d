//! `[tracing]`: OpenTelemetry span export (off by default; `observability/otlp.rs`).

use serde::{Deserialize, Serialize};

use super::types::{join, Dur, FieldError};

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP traces endpoint, the whole URL (a collector's is
    /// `http://collector:4318/v1/traces`); unset: no export.
    pub otlp_endpoint: Option<String>,
    /// A batch is posted at least this often (sooner when it is full).
    pub export_interval: Dur,
    /// Spans per export request at most.
    pub max_batch: usize,
    /// Spans waiting for export at most; beyond, new spans are dropped and counted.
    pub max_queue: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            export_interval: Dur::from_secs(1),
            max_batch: 512,
            max_queue: 4096,
        }
    }
}

impl TracingConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if let Some(url) = &self.otlp_endpoint {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
                _ => errors.push(FieldError::new(
                    join(path, "otlp_endpoint"),
                    format!("{url:?} is not an http(s) URL"),
                )),
            }
        }
        for (field, bad) in [
            ("export_interval", self.export_interval.0.is_zero()),
            ("max_batch", self.max_batch == 0),
            ("max_queue", self.max_queue == 0),
        ] {
            if bad {
                errors.push(FieldError::new(join(path, field), "must be greater than 0"));
            }
        }
    }
}
