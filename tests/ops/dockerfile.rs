//! The registry build path (`./Dockerfile`, for machines that can pull `rust:1-bookworm`)
//! cannot be run on a machine without registry access, so its one repo-specific risk is
//! checked here: the build stage COPYs everything cargo needs. Cargo refuses a manifest whose
//! declared targets are missing (this once broke the image: the benches were not copied), and
//! `include_bytes!` / `include_str!` need their files in the build context.

use std::path::{Component, Path, PathBuf};

/// The sources of the `COPY` lines of the first (build) stage, as repo-relative paths.
fn build_stage_copies() -> Vec<PathBuf> {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let mut copies = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
            if stages > 1 {
                break;
            }
        }
        if let Some(args) = line.strip_prefix("COPY ") {
            assert!(
                !args.contains("--from"),
                "build stage copies from a stage: {line}"
            );
            let words: Vec<&str> = args.split_whitespace().collect();
            // Every word but the last (the destination) is a source.
            copies.extend(words[..words.len() - 1].iter().map(PathBuf::from));
        }
    }
    assert!(stages >= 1, "Dockerfile has no FROM");
    copies
}

fn covered(path: &Path, copies: &[PathBuf]) -> bool {
    copies.iter().any(|c| path.starts_with(c))
}

/// `a/b/../c` -> `a/c` (lexically; the files need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every file the manifest declares: lib, bins, benches, tests, examples, build script.
fn declared_targets() -> Vec<PathBuf> {
    let manifest: toml::Table = std::fs::read_to_string("Cargo.toml")
        .unwrap()
        .parse()
        .unwrap();
    let mut paths = Vec::new();
    if let Some(build) = manifest["package"].get("build").and_then(|b| b.as_str()) {
        paths.push(PathBuf::from(build));
    }
    if let Some(lib) = manifest.get("lib").and_then(|l| l.get("path")) {
        paths.push(PathBuf::from(lib.as_str().unwrap()));
    }
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let path = match target.get("path") {
                Some(p) => PathBuf::from(p.as_str().unwrap()),
                None => Path::new(dir).join(format!("{}.rs", target["name"].as_str().unwrap())),
            };
            paths.push(path);
        }
    }
    paths
}

/// Files pulled in at compile time by `include_bytes!` / `include_str!` under `src/`.
fn included_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_name in ["include_bytes!(\"", "include_str!(\""] {
                    for piece in text.split(macro_name).skip(1) {
                        let relative = piece.split('"').next().unwrap();
                        out.push(normalize(&path.parent().unwrap().join(relative)));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("src"), &mut out);
    out
}

#[test]
fn the_registry_dockerfile_copies_everything_the_build_needs() {
    let copies = build_stage_copies();
    for needed in ["Cargo.toml", "Cargo.lock"] {
        assert!(
            covered(Path::new(needed), &copies),
            "{needed} not copied: {copies:?}"
        );
    }
    let targets = declared_targets();
    assert!(
        targets.iter().any(|t| t.starts_with("benches")),
        "the manifest parse found no benches: {targets:?}"
    );
    let included = included_files();
    assert!(!included.is_empty(), "no include_bytes! found under src/");
    for path in targets.iter().chain(&included) {
        assert!(path.exists(), "{} is declared but missing", path.display());
        assert!(
            covered(path, &copies),
            "{} is needed to build but the Dockerfile's build stage does not COPY it (copies: {copies:?})",
            path.display()
        );
    }
}

#[test]
fn the_check_sees_a_missing_copy() {
    // The helpers above must be able to fail: without `benches` the benches are uncovered.
    let copies: Vec<PathBuf> = build_stage_copies()
        .into_iter()
        .filter(|c| !c.starts_with("benches"))
        .collect();
    assert!(declared_targets()
        .iter()
        .any(|t| t.starts_with("benches") && !covered(t, &copies)));
    assert_eq!(
        normalize(Path::new("src/routes/../../assets/x.css")),
        PathBuf::from("assets/x.css")
    );
}
