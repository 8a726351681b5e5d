//! Configuration: the shipped example and fixtures parse, invalid ones fail with errors
//! that name the field, env overrides win, and `check-config` exits 0 / 2.

use std::path::Path;
use std::process::Command;

use deltastream_gateway::config::Config;
use deltastream_gateway::server::check;

/// Everything `serve` would refuse in `text`: validation and the route templates.
fn errors_of(text: &str) -> Vec<String> {
    match Config::from_toml(text).and_then(|c| check(&c).map(|_| c)) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|f| f.to_string()).collect(),
    }
}

#[test]
fn the_shipped_example_config_parses_and_validates() {
    let cfg = Config::from_file(Path::new("gateway.example.toml")).expect("example parses");
    check(&cfg).expect("example validates");
    assert_eq!(cfg.limits.max_body.0, 1 << 20);
    assert!(cfg
        .routes
        .iter()
        .any(|r| r.path == "/api/data/underlying/{product}"));
    assert_eq!(
        cfg.upstreams["storage"].unavailable_message(""),
        "Storage service unavailable"
    );
}

#[test]
fn every_valid_fixture_parses_and_every_invalid_one_fails() {
    for entry in std::fs::read_dir("tests/fixtures/config").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let result = Config::from_file(&path).and_then(|c| check(&c).map(|_| c));
        if name.starts_with("valid") {
            result.unwrap_or_else(|e| panic!("{name} should be valid:\n{e}"));
        } else {
            assert!(result.is_err(), "{name} should be invalid");
        }
    }
}

#[test]
fn embedded_default_is_the_deltastream_table() {
    let cfg = Config::embedded();
    cfg.validate().unwrap();
    assert_eq!(cfg.server.port, 8000);
    assert_eq!(cfg.admin.port, 9000);
    assert_eq!(cfg.admin.host.to_string(), "127.0.0.1");
    assert_eq!(cfg.service_name, "api-gateway");
    assert_eq!(cfg.upstreams["auth"].url, "http://auth:8001");
    assert_eq!(cfg.upstreams["storage"].url, "http://storage:8003");
    assert_eq!(cfg.upstreams["analytics"].url, "http://analytics:8004");
    assert_eq!(cfg.upstreams["analytics"].timeout.0.as_secs(), 30);
    assert_eq!(cfg.routes.len(), 9);
}

#[test]
fn errors_name_the_field_path() {
    let e = errors_of("[[routes]]\npath = \"/a\"\nupstream = \"storage\"\n[[routes]]\npath = \"/b\"\nupstream = \"storage\"\ntimeout = \"10\"\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("routes[1].timeout: invalid duration \"10\"")),
        "{e:?}"
    );

    let e = errors_of("[limits]\nmax_bodyy = 1\n");
    assert!(
        e[0].starts_with("limits.max_bodyy: unknown field `max_bodyy`"),
        "{e:?}"
    );

    let e = errors_of("[server]\nport = \"eighty\"\n");
    assert!(e[0].starts_with("server.port"), "{e:?}");

    let e = errors_of("[server]\nmemory_trim_interval = \"10ms\"\n");
    assert_eq!(
        e,
        ["server.memory_trim_interval: must be 0s (off) or at least 100ms, got 10ms"],
        "{e:?}"
    );

    let e = errors_of(
        &std::fs::read_to_string("tests/fixtures/config/invalid_references.toml").unwrap(),
    );
    let joined = e.join("\n");
    for want in [
        "trusted_proxies[1]: invalid CIDR",
        "upstreams.broken.url: invalid upstream URL",
        "routes[0].upstream: no upstream named \"nonexistent\"",
        "routes[0].upstream_path: uses {other}",
        "routes[0].methods[0]: invalid HTTP method \"get\"",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }

    // A template that does not parse is an error naming its field, never a route left out.
    let e = errors_of("[[routes]]\npath = \"/api/x/{id\"\nupstream = \"storage\"\n");
    assert!(e.iter().any(|m| m.starts_with("routes[0].path:")), "{e:?}");
    let e = errors_of(
        "[[routes]]\npath = \"/api/x/{id}\"\nupstream = \"storage\"\nupstream_path = \"/x/{id\"\n",
    );
    assert!(
        e.iter().any(|m| m.starts_with("routes[0].upstream_path:")),
        "{e:?}"
    );

    // The retry and breaker sections are validated too (they once were not).
    let e = errors_of("[upstreams.storage.retry]\nbudget_ratio = 5.0\n[upstreams.storage.breaker]\nprobe_path = \"health\"\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.retry.budget_ratio")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.breaker.probe_path")),
        "{e:?}"
    );
    let e = errors_of("[upstreams.storage]\nurl = \"http://a:1\"\nurls = [\"http://a:1\", \"http://b:1/v2\", \"ftp://c\"]\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.urls: give `url` or `urls`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.urls[1]: ")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.urls[2]: invalid upstream URL")),
        "{e:?}"
    );
    let e = errors_of("[upstreams.storage.ejection]\nmax_ejected_percent = 101\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.ejection.max_ejected_percent")),
        "{e:?}"
    );

    let e = errors_of("[upstreams.storage]\nmax_connections = 0\n");
    assert!(
        e.iter()
            .any(|m| m.starts_with("upstreams.storage.max_connections")),
        "{e:?}"
    );

    let e = errors_of("[errors]\ntimeout_status = 502\n");
    assert!(e[0].starts_with("errors.timeout_status"), "{e:?}");
    let e = errors_of("[auth]\nmode = \"local\"\n");
    assert!(e[0].starts_with("auth.jwt_secret"), "{e:?}");
    let e = errors_of("[[routes]]\npath = \"/api/data/products\"\nupstream = \"storage\"\n[[routes]]\npath = \"/api/data/products\"\nupstream = \"storage\"\n");
    assert!(
        e.iter().any(|m| m.contains("duplicate route path")),
        "{e:?}"
    );
    let e = errors_of("[[routes]]\npath = \"/x/{a\"\nupstream = \"storage\"\n");
    assert!(e[0].starts_with("routes[0].path"), "{e:?}");
}

#[test]
fn every_parse_error_is_reported_and_a_route_has_one_number() {
    // serde stops at the first problem; check-config goes on to the others: in every
    // section, in one upstream, in every route.
    let text = "[server]\nport = \"x\"\n\
                [upstreams.storage]\nmax_connections = \"many\"\ntimeout = \"10\"\n\
                [[routes]]\npath = \"/a\"\nupstream = \"storage\"\ntimeout = \"10\"\n\
                [[routes]]\npath = \"/b\"\nupstream = \"storage\"\nbogus = 1\nretries = -1\n";
    let e = errors_of(text);
    let at: Vec<&str> = e.iter().map(|m| m.split(':').next().unwrap()).collect();
    for want in [
        "server.port",
        "upstreams.storage.max_connections",
        "upstreams.storage.timeout",
        "routes[0].timeout",
        "routes[1].bogus",
        "routes[1].retries",
    ] {
        assert!(at.contains(&want), "{want} missing from {e:#?}");
    }
    assert_eq!(e.len(), 6, "{e:#?}");

    // The file's first route is routes[0] whether the problem is found while parsing or
    // later (validation, templates), though the embedded routes are there too.
    let parse = errors_of("[[routes]]\npath = \"/x/{a}\"\nupstream = \"storage\"\ntimeout = 5\n");
    assert!(parse[0].starts_with("routes[0].timeout"), "{parse:?}");
    let semantic = errors_of("[[routes]]\npath = \"/x/{a}\"\nupstream = \"nowhere\"\n");
    assert!(
        semantic[0].starts_with("routes[0].upstream"),
        "{semantic:?}"
    );
    let template = errors_of("[[routes]]\npath = \"/x/{a\"\nupstream = \"storage\"\n");
    assert!(template[0].starts_with("routes[0].path"), "{template:?}");
    // The file's routes come first in the merged table; the embedded ones follow.
    let cfg = Config::from_toml("[[routes]]\npath = \"/x\"\nupstream = \"storage\"\n").unwrap();
    assert_eq!(cfg.routes[0].path, "/x");
    assert_eq!(cfg.routes.len(), 10);
}

#[test]
fn a_partial_override_of_an_embedded_upstream_keeps_the_rest_of_it() {
    let cfg = Config::from_toml(
        "[upstreams.storage]\nmax_connections = 16\n[upstreams.analytics.retry]\nmax_retries = 0\n",
    )
    .unwrap();
    check(&cfg).unwrap();
    let storage = &cfg.upstreams["storage"];
    assert_eq!(storage.max_connections, 16);
    assert_eq!(storage.url, "http://storage:8003");
    let analytics = &cfg.upstreams["analytics"];
    assert_eq!(analytics.retry.max_retries, 0);
    assert_eq!(
        analytics.timeout.0.as_secs(),
        30,
        "the embedded timeout is kept"
    );
    assert_eq!(analytics.url, "http://analytics:8004");

    // The environment's URL replaces the embedded one.
    let mut cfg = Config::from_toml("[upstreams.storage]\nmax_connections = 16\n").unwrap();
    cfg.apply_env(|k| (k == "STORAGE_SERVICE_URL").then(|| "http://a:1,http://b:1".to_string()))
        .unwrap();
    check(&cfg).unwrap();
    assert_eq!(cfg.upstreams["storage"].urls, ["http://a:1", "http://b:1"]);
    assert_eq!(cfg.upstreams["storage"].max_connections, 16);

    // A file that gives `urls` takes neither `url` nor `urls` from the embedded upstream.
    let cfg = Config::from_toml("[upstreams.storage]\nurls = [\"http://a:1\", \"http://b:1\"]\n")
        .unwrap();
    check(&cfg).unwrap();
    assert_eq!(cfg.upstreams["storage"].url, "");
    // Without the embedded table, an upstream is what the file says.
    let e = errors_of("inherit_defaults = false\n[upstreams.storage]\nmax_connections = 16\n");
    assert!(
        e.iter().any(|m| m.starts_with("upstreams.storage.url")),
        "{e:?}"
    );
}

#[test]
fn a_bad_value_from_the_environment_is_named_by_its_variable() {
    let mut cfg = Config::embedded();
    cfg.apply_env(|k| match k {
        "STORAGE_SERVICE_URL" => Some("ftp://storage".to_string()),
        "ANALYTICS_SERVICE_URL" => Some("http://a:1,nope".to_string()),
        "CONFIG_FINGERPRINT_KEY" => Some("short".to_string()),
        _ => None,
    })
    .unwrap();
    let e: Vec<String> = cfg
        .validate()
        .unwrap_err()
        .0
        .iter()
        .map(|f| f.to_string())
        .collect();
    for want in [
        "STORAGE_SERVICE_URL: invalid upstream URL \"ftp://storage\"",
        "(the variable sets upstreams.storage.url)",
        "ANALYTICS_SERVICE_URL: invalid upstream URL \"nope\"",
        "(the variable sets upstreams.analytics.urls[1])",
        "CONFIG_FINGERPRINT_KEY: must be at least 16 characters",
    ] {
        assert!(
            e.iter().any(|m| m.contains(want)),
            "{want:?} missing from {e:#?}"
        );
    }
    assert!(!e.iter().any(|m| m.starts_with("upstreams.")), "{e:#?}");

    // And from check-config, with the file's own problems by their field path.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.toml");
    std::fs::write(&file, "[[routes]]\npath = \"/x\"\nupstream = \"nowhere\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .arg("check-config")
        .arg(&file)
        .env("STORAGE_SERVICE_URL", "storage:8003")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\nSTORAGE_SERVICE_URL: invalid upstream URL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\nroutes[0].upstream: no upstream named"),
        "{stderr}"
    );
    // A variable that does not even parse hides nothing either.
    let out = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .arg("check-config")
        .arg(&file)
        .env("PORT", "80x")
        .env("STORAGE_SERVICE_URL", "storage:8003")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "\nPORT: invalid port \"80x\"",
        "\nSTORAGE_SERVICE_URL: invalid upstream URL",
        "\nroutes[0].upstream: no upstream named",
    ] {
        assert!(stderr.contains(want), "{want:?} missing: {stderr}");
    }
}

#[test]
fn check_config_refuses_two_different_files() {
    let bin = env!("CARGO_BIN_EXE_deltastream-gateway");
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(bin);
        cmd.args(args).env_remove("GATEWAY_CONFIG");
        if let Some(file) = env {
            cmd.env("GATEWAY_CONFIG", file);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let invalid = "tests/fixtures/config/invalid_duration.toml";
    let valid = "gateway.example.toml";
    // Which one would it check? Neither: it says so.
    let (code, stderr, _) = run(&["check-config", "--config", invalid, valid], None);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("two files given"), "{stderr}");
    let (code, stderr, _) = run(&["--config", invalid, "check-config", valid], None);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("two files given"), "{stderr}");
    // One file, however it is given; the argument wins over the environment.
    let (code, _, stdout) = run(&["--config", valid, "check-config"], None);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("gateway.example.toml: OK"), "{stdout}");
    let (code, _, stdout) = run(&["check-config", "--config", valid, valid], None);
    assert_eq!(code, Some(0), "{stdout}");
    let (code, _, stdout) = run(&["check-config", valid], Some(invalid));
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stderr, _) = run(&["check-config"], None);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no file given"), "{stderr}");
}

#[test]
fn a_file_extends_or_replaces_the_default() {
    let cfg = Config::from_file(Path::new("tests/fixtures/config/valid_minimal.toml")).unwrap();
    assert_eq!(cfg.routes.len(), 10);
    assert_eq!(cfg.upstreams.len(), 5);
    let cfg = Config::from_file(Path::new("tests/fixtures/config/valid_standalone.toml")).unwrap();
    assert_eq!(cfg.routes.len(), 1);
    assert_eq!(cfg.upstreams.len(), 1);
    // Replacing one default route by path keeps the others.
    let cfg = Config::from_toml(
        "[[routes]]\npath = \"/api/data/products\"\nupstream = \"storage\"\nauth = true\n",
    )
    .unwrap();
    assert_eq!(cfg.routes.len(), 9);
    assert!(
        cfg.routes
            .iter()
            .find(|r| r.path == "/api/data/products")
            .unwrap()
            .auth
    );
}

#[test]
fn environment_overrides_the_file() {
    let mut cfg = Config::from_toml("[server]\nport = 1234\n").unwrap();
    let env = |k: &str| match k {
        "PORT" => Some("8080".to_string()),
        "ADMIN_PORT" => Some("9090".to_string()),
        "SERVICE_NAME" => Some("edge-eu".to_string()),
        "STORAGE_SERVICE_URL" => Some("https://storage.deltastream.internal".to_string()),
        _ => None,
    };
    cfg.apply_env(env).unwrap();
    assert_eq!(cfg.server.port, 8080);
    assert_eq!(cfg.admin.port, 9090);
    assert_eq!(cfg.service_name, "edge-eu");
    assert_eq!(
        cfg.upstreams["storage"].url,
        "https://storage.deltastream.internal"
    );
    cfg.validate().unwrap();

    let mut cfg = Config::embedded();
    let err = cfg
        .apply_env(|k| (k == "PORT").then(|| "80x".to_string()))
        .unwrap_err();
    assert_eq!(err.0[0].to_string(), "PORT: invalid port \"80x\"");
}

#[test]
fn check_config_exits_0_with_a_summary_or_2_with_the_errors() {
    let bin = env!("CARGO_BIN_EXE_deltastream-gateway");
    let ok = Command::new(bin)
        .args(["check-config", "gateway.example.toml"])
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("OK") && out.contains("/api/data/underlying/{product}"),
        "{out}"
    );

    let bad = Command::new(bin)
        .args([
            "check-config",
            "tests/fixtures/config/invalid_duration.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("routes[1].timeout: invalid duration \"10\""),
        "{err}"
    );

    let missing = Command::new(bin)
        .args(["check-config", "no/such/file.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn check_config_into_a_closed_pipe_exits_0_without_a_panic() {
    // `check-config FILE | head -1`: the reader is gone before the summary is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .args(["check-config", "gateway.example.toml"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn serve_help_lists_every_environment_variable_of_the_readme_with_its_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // The README's table of environment variables is the reference; --help must not drift.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("| environment variable |")
        .nth(1)
        .expect("README has the environment table");
    let vars: Vec<&str> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .collect();
    assert!(vars.len() >= 10, "{vars:?}");
    let lines: Vec<&str> = help.lines().collect();
    for var in vars {
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{var} ")))
            .unwrap_or_else(|| panic!("{var} missing from serve --help:\n{help}"));
        // The entry: its line and the indented continuation lines under it.
        let entry: String = std::iter::once(lines[at])
            .chain(
                lines[at + 1..]
                    .iter()
                    .copied()
                    .take_while(|l| l.starts_with("    ")),
            )
            .collect();
        assert!(
            entry.contains("[default:"),
            "{var} without a default: {entry}"
        );
    }
    assert!(help.contains("SIGHUP"), "{help}");
}

#[test]
fn check_config_names_the_line_and_column_of_a_toml_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "[server]\nport = 8000\n[[routes]\npath = \"/x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3, column"), "{stderr}");
}

#[test]
fn listener_settings_are_checked_and_named_by_field() {
    let e = errors_of(
        &std::fs::read_to_string("tests/fixtures/config/invalid_listeners.toml").unwrap(),
    );
    let joined = e.join("\n");
    for want in [
        "server.tls.hsts.preload: needs include_subdomains = true and max_age of at least 365 days",
        "server.redirect_http.host: \"evil.example?\" is not a DNS name",
        "server.redirect_http.max_connections: must be at least 1",
        "admin.max_connections: must be at least 1",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
    // Unknown keys in the new sections are errors too.
    let e = errors_of("[admin]\nmax_conections = 5\n");
    assert!(e.iter().any(|m| m.contains("max_conections")), "{e:?}");
    // The defaults: HSTS off, the admin listener's own cap, no configured redirect host.
    let cfg = Config::embedded();
    assert_eq!(cfg.admin.max_connections, 64);
    assert!(cfg.server.tls.is_none() && cfg.server.redirect_http.is_none());
    let r: deltastream_gateway::config::RedirectConfig = toml::from_str("port = 8080").unwrap();
    assert_eq!((r.host, r.max_connections), (None, 1024));
}
