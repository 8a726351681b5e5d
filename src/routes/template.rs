//! Path templates (`/api/data/underlying/{product}`): parsing, matching a raw request path,
//! and rewriting into the upstream path.
//!
//! Matching works on the raw (still percent-encoded) path, one segment per parameter, so a
//! parameter can never contain a `/`. A parameter is then checked in its decoded form:
//! an encoded slash or backslash, a dot segment (also `..;x` and `.%2e%3Bx`: servlet
//! containers drop a `;` path parameter before resolving dots), a control character, or a
//! second layer of percent-encoding (`%252e`, which an upstream that decodes twice reads as
//! `.`) is refused (400) rather than forwarded, so nothing a client sends can make
//! the upstream see a path outside the rewrite template. Accepted parameters are forwarded
//! exactly as the client encoded them.

use std::borrow::Cow;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// Index into the route's parameter list.
    Param(usize),
}

#[derive(Clone, Debug)]
pub struct Template {
    pub segments: Vec<Segment>,
    names: Vec<String>,
}

impl Template {
    pub fn param_names(&self) -> Vec<String> {
        self.names.clone()
    }

    pub fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Matches raw path segments; on success returns the raw parameter values in order.
    pub fn matches<'a>(&self, segments: &[&'a str]) -> Option<Vec<&'a str>> {
        if segments.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::with_capacity(self.names.len());
        for (seg, want) in segments.iter().zip(&self.segments) {
            match want {
                Segment::Literal(l) => {
                    if l != seg {
                        return None;
                    }
                }
                Segment::Param(_) => {
                    if seg.is_empty() {
                        return None;
                    }
                    params.push(*seg);
                }
            }
        }
        Some(params)
    }

    /// Builds the upstream path from `self` (an upstream template) using parameter values
    /// found by `source` (the public template), matched by name.
    pub fn render(&self, source: &Template, values: &[&str], out: &mut String) {
        for seg in &self.segments {
            out.push('/');
            match seg {
                Segment::Literal(l) => out.push_str(l),
                Segment::Param(i) => {
                    let name = &self.names[*i];
                    if let Some(pos) = source.names.iter().position(|n| n == name) {
                        if let Some(v) = values.get(pos) {
                            out.push_str(v);
                        }
                    }
                }
            }
        }
        if self.segments.is_empty() {
            out.push('/');
        }
    }
}

/// Parses `/a/{b}/c`. Errors are messages for a config field.
pub fn parse_template(text: &str) -> Result<Template, String> {
    if !text.starts_with('/') {
        return Err(format!("{text:?} must start with '/'"));
    }
    let mut segments = Vec::new();
    let mut names: Vec<String> = Vec::new();
    if text == "/" {
        return Ok(Template { segments, names });
    }
    for seg in text[1..].split('/') {
        if seg.is_empty() {
            return Err(format!("{text:?} has an empty segment"));
        }
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let valid =
                !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("{text:?} has an invalid parameter name {seg:?}"));
            }
            if names.iter().any(|n| n == inner) {
                return Err(format!("{text:?} repeats parameter {{{inner}}}"));
            }
            segments.push(Segment::Param(names.len()));
            names.push(inner.to_string());
        } else if seg.contains(['{', '}']) {
            return Err(format!(
                "{text:?}: a parameter must be a whole segment, like /{{product}}"
            ));
        } else if seg == "." || seg == ".." {
            return Err(format!("{text:?} has a dot segment"));
        } else if !seg.bytes().all(is_path_char) {
            return Err(format!(
                "{text:?} has a character that must be percent-encoded"
            ));
        } else {
            segments.push(Segment::Literal(seg.to_string()));
        }
    }
    Ok(Template { segments, names })
}

/// RFC 3986 pchar, minus '%' (templates are written unencoded).
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// `.` or `..` as an upstream resolves it: the segment up to its first `;` (decoded, so `%3B`
/// counts), because Tomcat, Jetty and other servlet containers drop `;` path parameters
/// before resolving dot segments and read `..;x` as `..`.
fn is_dot_segment(decoded: &str) -> bool {
    let name = decoded.split(';').next().unwrap_or(decoded);
    name == "." || name == ".."
}

/// Why a parameter value was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadParam(pub &'static str);

/// Checks one raw parameter value; see the module docs for the rules.
pub fn check_param(raw: &str) -> Result<(), BadParam> {
    if !raw.bytes().all(|b| is_path_char(b) || b == b'%') {
        return Err(BadParam(
            "path parameter has characters that must be percent-encoded",
        ));
    }
    let decoded: Cow<'_, [u8]> = percent_encoding::percent_decode_str(raw).into();
    let decoded =
        std::str::from_utf8(&decoded).map_err(|_| BadParam("path parameter is not valid UTF-8"))?;
    if is_dot_segment(decoded) {
        return Err(BadParam("path parameter is a dot segment"));
    }
    if decoded.contains(['/', '\\']) {
        return Err(BadParam("path parameter contains a slash"));
    }
    if decoded.contains('%') {
        return Err(BadParam("path parameter is percent-encoded twice"));
    }
    if decoded.chars().any(char::is_control) {
        return Err(BadParam("path parameter contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<&str> {
        path[1..].split('/').collect()
    }

    #[test]
    fn parses_and_matches() {
        let t = parse_template("/api/data/underlying/{product}").unwrap();
        assert_eq!(t.param_names(), vec!["product"]);
        assert_eq!(
            t.matches(&segs("/api/data/underlying/NIFTY")),
            Some(vec!["NIFTY"])
        );
        assert_eq!(t.matches(&segs("/api/data/underlying/")), None);
        assert_eq!(t.matches(&segs("/api/data/underlying/a/b")), None);
        assert_eq!(t.matches(&segs("/api/data/other/NIFTY")), None);
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(parse_template("api").is_err());
        assert!(parse_template("/a//b").is_err());
        assert!(parse_template("/a/{b").is_err());
        assert!(parse_template("/a/x{b}").is_err());
        assert!(parse_template("/a/{b}/{b}").is_err());
        assert!(parse_template("/a/../b").is_err());
        assert!(parse_template("/a/b c").is_err());
    }

    #[test]
    fn renders_by_name() {
        let public = parse_template("/api/data/chain/{product}").unwrap();
        let up = parse_template("/option/chain/{product}").unwrap();
        let mut out = String::new();
        up.render(&public, &["NIFTY%20X"], &mut out);
        assert_eq!(out, "/option/chain/NIFTY%20X");
    }

    #[test]
    fn params_that_try_to_escape_are_refused() {
        for bad in [
            "..",
            ".",
            "%2e%2e",
            "%2E.",
            "a%2Fb",
            "%2f",
            "a%5Cb",
            "%252F",
            "%00",
            "a%0Db",
            "a\\b",
            "%ff",
            "a b",
            "..;",
            "..;x=1",
            "%2e%2e;",
            ".%2e;",
            "%2E%2E;",
            ".;",
            "..%3B",
            "..%3bjsessionid=1",
            "%252e%252e",
            "%u002e",
        ] {
            assert!(check_param(bad).is_err(), "{bad} accepted");
        }
        for good in [
            "NIFTY",
            "BANK%20NIFTY",
            "a.b",
            "x~y",
            "caf%C3%A9",
            "...",
            "a;..",
            "..a;",
            ";..",
        ] {
            assert_eq!(check_param(good), Ok(()), "{good} refused");
        }
    }
}
