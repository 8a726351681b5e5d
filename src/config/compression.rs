//! The `[compression]` section: response compression negotiated from `Accept-Encoding`.

use serde::{Deserialize, Serialize};

use super::types::{join, ByteSize, FieldError};

/// The content codings the gateway can produce.
pub const CODINGS: [&str; 3] = ["gzip", "br", "zstd"];

/// How hard each coding works; one name for all three, mapped in `routes::compress`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionLevel {
    /// gzip 1, br 1, zstd 1: least CPU per byte.
    Fastest,
    /// gzip 6, br 4, zstd 3: most of the size gain for a fraction of `best`'s CPU.
    #[default]
    Default,
    /// gzip 9, br 11, zstd 19: smallest output, many times the CPU.
    Best,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Routes compress unless they say `compression = false` (or every route, when off,
    /// unless it says `compression = true`).
    pub enabled: bool,
    /// Codings offered, in the gateway's order of preference when a client weighs several
    /// equally.
    pub codings: Vec<String>,
    pub level: CompressionLevel,
    /// Bodies of a known size below this go out as they are: framing would eat the gain.
    pub min_size: ByteSize,
    /// Media types compressed (`type/subtype`, or `type/` for all of a type); others (images,
    /// archives, already dense data) pass untouched.
    pub content_types: Vec<String>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            codings: CODINGS.iter().map(|c| c.to_string()).collect(),
            level: CompressionLevel::Default,
            min_size: ByteSize(1024),
            content_types: [
                "application/json",
                "application/problem+json",
                "text/",
                "application/javascript",
                "application/xml",
                "image/svg+xml",
            ]
            .iter()
            .map(|t| t.to_string())
            .collect(),
        }
    }
}

impl CompressionConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.codings.is_empty() {
            errors.push(FieldError::new(
                join(path, "codings"),
                "list at least one coding, or set enabled = false",
            ));
        }
        for (i, coding) in self.codings.iter().enumerate() {
            if !CODINGS.contains(&coding.as_str()) {
                errors.push(FieldError::new(
                    format!("{path}.codings[{i}]"),
                    format!("unknown coding {coding:?} (known: {})", CODINGS.join(", ")),
                ));
            } else if self.codings[..i].contains(coding) {
                errors.push(FieldError::new(
                    format!("{path}.codings[{i}]"),
                    format!("{coding:?} is listed twice"),
                ));
            }
        }
        for (i, ty) in self.content_types.iter().enumerate() {
            let well_formed = ty
                .split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !t.contains(';') && !s.contains(';'))
                && ty == &ty.to_ascii_lowercase();
            if !well_formed {
                errors.push(FieldError::new(
                    format!("{path}.content_types[{i}]"),
                    format!(
                        "{ty:?} is not a lower-case media type (\"application/json\", or \"text/\" for every text type)"
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(cfg: &CompressionConfig) -> Vec<String> {
        let mut errors = Vec::new();
        cfg.validate("compression", &mut errors);
        errors.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn the_default_is_valid_and_mistakes_name_their_field() {
        assert!(errors(&CompressionConfig::default()).is_empty());
        let bad = CompressionConfig {
            codings: vec!["gzip".into(), "deflate".into(), "gzip".into()],
            content_types: vec!["application/json".into(), "JSON".into(), "Text/".into()],
            ..CompressionConfig::default()
        };
        let shown = errors(&bad).join("\n");
        assert!(
            shown.contains("compression.codings[1]")
                && shown.contains("unknown coding \"deflate\""),
            "{shown}"
        );
        assert!(
            shown.contains("compression.codings[2]") && shown.contains("listed twice"),
            "{shown}"
        );
        assert!(shown.contains("compression.content_types[1]"), "{shown}");
        assert!(shown.contains("compression.content_types[2]"), "{shown}");
        assert!(!shown.contains("content_types[0]"), "{shown}");
        let none = CompressionConfig {
            codings: Vec::new(),
            ..CompressionConfig::default()
        };
        assert!(errors(&none)
            .join("\n")
            .contains("compression.codings: list at least one"));
    }
}
