//! Response schemas in the route table (`[routes.openapi.responses."200"]`): reading the
//! ones kept in files, checking that each is an OpenAPI 3.0 Schema Object, and naming the
//! titled ones, so that the document generator and validation agree on what a name means.

use std::path::Path;

use serde_json::{Map, Value};

use super::types::FieldError;

/// Components the document generator always defines; a route's schema may `$ref` them, and no
/// route schema may take their names.
pub const BUILTIN_SCHEMAS: &[&str] = &["Error", "ErrorReason", "ServiceError", "User"];

/// Where a `$ref` may point: the document's named schemas.
const REF_PREFIX: &str = "#/components/schemas/";

/// The JSON types an OpenAPI 3.0 schema knows (no `null`: that is `nullable: true`).
const TYPES: &[&str] = &["string", "number", "integer", "boolean", "array", "object"];

/// JSON Schema keywords that OpenAPI 3.0 does not have: a generator would ignore them, so a
/// schema using them would promise checks nobody makes.
const UNSUPPORTED: &[&str] = &[
    "$defs",
    "definitions",
    "$id",
    "$schema",
    "const",
    "examples",
    "if",
    "then",
    "else",
    "prefixItems",
    "contains",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
    "unevaluatedItems",
];

/// The schema in `path` (a `schema_file`), or why it cannot be used. A `$schema` dialect
/// line is dropped: the document states its own (OpenAPI 3.0).
pub fn read_schema_file(path: &Path) -> Result<Value, String> {
    let text = read_bounded(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut schema: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not JSON: {} at line {}, column {}",
            path.display(),
            e,
            e.line(),
            e.column()
        )
    })?;
    if let Some(object) = schema.as_object_mut() {
        object.remove("$schema");
    }
    Ok(schema)
}

/// A schema file's text: a regular file of at most [`MAX_SCHEMA_FILE`] bytes (a device
/// such as /dev/zero, or a mistyped path to something huge, must not hang the load).
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_SCHEMA_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SCHEMA_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SCHEMA_FILE} bytes"
        )));
    }
    Ok(text)
}

/// Far above any response schema; the document is built from these on every load.
const MAX_SCHEMA_FILE: u64 = 1 << 20;

/// Checks that `schema` is an OpenAPI 3.0 Schema Object, reporting under `at`; every `$ref`
/// it holds is pushed to `refs` (with where it was) for the caller to resolve.
pub fn check_schema(
    schema: &Value,
    at: &str,
    errors: &mut Vec<FieldError>,
    refs: &mut Vec<(String, String)>,
) {
    let Some(object) = schema.as_object() else {
        errors.push(FieldError::new(
            at,
            "must be a schema object, e.g. { type = \"object\", properties = { ... } }",
        ));
        return;
    };
    if let Some(target) = object.get("$ref") {
        match target.as_str().and_then(|t| t.strip_prefix(REF_PREFIX)) {
            Some(name) if !name.is_empty() => refs.push((at.to_string(), name.to_string())),
            _ => errors.push(FieldError::new(
                format!("{at}.$ref"),
                format!(
                    "only \"{REF_PREFIX}NAME\" is supported (NAME: a built-in schema or the \
                     title of a route's object schema), got {target}"
                ),
            )),
        }
    }
    for keyword in UNSUPPORTED {
        if object.contains_key(*keyword) {
            errors.push(FieldError::new(
                format!("{at}.{keyword}"),
                "not part of an OpenAPI 3.0 schema (give named schemas a title instead of \
                 definitions; use enum for const, nullable for null)",
            ));
        }
    }
    match object.get("type") {
        None => {}
        Some(Value::String(t)) if t == "array" && !object.contains_key("items") => {
            errors.push(FieldError::new(
                format!("{at}.items"),
                "an array schema needs items",
            ));
        }
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {}
        Some(other) => errors.push(FieldError::new(
            format!("{at}.type"),
            format!(
                "must be one of {} (one type; null is nullable = true), got {other}",
                TYPES.join(", ")
            ),
        )),
    }
    if let Some(title) = object.get("title") {
        if !title.as_str().is_some_and(is_component_name) {
            errors.push(FieldError::new(
                format!("{at}.title"),
                format!("must be letters, digits, '_' or '-' (it names a component), got {title}"),
            ));
        }
    }
    match object.get("properties") {
        None => {}
        Some(Value::Object(properties)) => {
            for (name, sub) in properties {
                check_schema(sub, &format!("{at}.properties.{name}"), errors, refs);
            }
        }
        Some(_) => errors.push(FieldError::new(
            format!("{at}.properties"),
            "must be a table of schemas",
        )),
    }
    if let Some(required) = object.get("required") {
        let names = required
            .as_array()
            .filter(|r| r.iter().all(Value::is_string));
        if names.is_none_or(|n| n.is_empty()) {
            errors.push(FieldError::new(
                format!("{at}.required"),
                "must be a non-empty list of property names",
            ));
        }
    }
    for keyword in ["items", "not"] {
        if let Some(sub) = object.get(keyword) {
            check_schema(sub, &format!("{at}.{keyword}"), errors, refs);
        }
    }
    if let Some(sub) = object
        .get("additionalProperties")
        .filter(|v| !v.is_boolean())
    {
        check_schema(sub, &format!("{at}.additionalProperties"), errors, refs);
    }
    for keyword in ["oneOf", "anyOf", "allOf"] {
        match object.get(keyword) {
            None => {}
            Some(Value::Array(subs)) if !subs.is_empty() => {
                for (i, sub) in subs.iter().enumerate() {
                    check_schema(sub, &format!("{at}.{keyword}[{i}]"), errors, refs);
                }
            }
            Some(_) => errors.push(FieldError::new(
                format!("{at}.{keyword}"),
                "must be a non-empty list of schemas",
            )),
        }
    }
}

/// A component name as OpenAPI allows it (`^[a-zA-Z0-9._-]+$`, without the dot, which some
/// generators turn into module paths).
fn is_component_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `schema` with every object schema that has a `title` moved into `named` and replaced by a
/// `$ref` to it: the title is the name a generated client gives the class, and one title
/// used by several routes is one class. A title already in `named` with a different schema
/// is an error naming the title.
pub fn hoist_titled(schema: &Value, named: &mut Map<String, Value>) -> Result<Value, String> {
    let Some(object) = schema.as_object() else {
        return Ok(schema.clone());
    };
    let mut out = Map::with_capacity(object.len());
    for (keyword, value) in object {
        let value = match keyword.as_str() {
            "properties" => match value.as_object() {
                Some(properties) => {
                    let mut hoisted = Map::with_capacity(properties.len());
                    for (name, sub) in properties {
                        hoisted.insert(name.clone(), hoist_titled(sub, named)?);
                    }
                    Value::Object(hoisted)
                }
                None => value.clone(),
            },
            "items" | "not" | "additionalProperties" => hoist_titled(value, named)?,
            "oneOf" | "anyOf" | "allOf" => match value.as_array() {
                Some(subs) => Value::Array(
                    subs.iter()
                        .map(|sub| hoist_titled(sub, named))
                        .collect::<Result<_, _>>()?,
                ),
                None => value.clone(),
            },
            _ => value.clone(),
        };
        out.insert(keyword.clone(), value);
    }
    let is_object =
        out.get("type").and_then(Value::as_str) == Some("object") || out.contains_key("properties");
    let title = out.get("title").and_then(Value::as_str).map(str::to_owned);
    match title {
        Some(title) if is_object => {
            let body = Value::Object(out);
            match named.get(&title) {
                Some(existing) if *existing != body => return Err(title),
                Some(_) => {}
                None => {
                    named.insert(title.clone(), body);
                }
            }
            Ok(serde_json::json!({ "$ref": format!("{REF_PREFIX}{title}") }))
        }
        _ => Ok(Value::Object(out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(schema: Value) -> Vec<String> {
        let mut errors = Vec::new();
        let mut refs = Vec::new();
        check_schema(&schema, "s", &mut errors, &mut refs);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn json_schema_dialect_features_outside_openapi_3_0_are_named() {
        assert!(
            problems(json!({"type": "object", "properties": {"a": {"type": "string"}}})).is_empty()
        );
        let found = problems(json!({
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"]},
                "b": {"type": "array"},
                "c": {"const": 1},
                "d": {"$ref": "#/definitions/D"}
            }
        }));
        let joined = found.join("\n");
        for path in [
            "s.properties.a.type",
            "s.properties.b.items",
            "s.properties.c.const",
            "s.properties.d.$ref",
        ] {
            assert!(joined.contains(path), "{path} not reported in:\n{joined}");
        }
        assert_eq!(problems(json!("string")).len(), 1);
    }

    #[test]
    fn titled_objects_become_named_once_and_conflicts_are_reported() {
        let tick =
            json!({"title": "Tick", "type": "object", "properties": {"p": {"type": "number"}}});
        let list =
            json!({"type": "object", "properties": {"ticks": {"type": "array", "items": tick}}});
        let mut named = Map::new();
        let hoisted = hoist_titled(&list, &mut named).unwrap();
        assert_eq!(
            hoisted["properties"]["ticks"]["items"],
            json!({"$ref": "#/components/schemas/Tick"})
        );
        assert_eq!(named["Tick"]["properties"]["p"]["type"], "number");
        // The same schema again is the same component...
        hoist_titled(&list, &mut named).unwrap();
        assert_eq!(named.len(), 1);
        // ...a different one under the same title is a conflict.
        let other =
            json!({"title": "Tick", "type": "object", "properties": {"q": {"type": "number"}}});
        assert_eq!(hoist_titled(&other, &mut named), Err("Tick".to_string()));
        // A property named "title" is a property, not a keyword.
        let book = json!({"type": "object", "properties": {"title": {"type": "string"}}});
        assert_eq!(hoist_titled(&book, &mut named).unwrap(), book);
    }
}
