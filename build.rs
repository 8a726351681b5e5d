//! Records the git commit the binary is built from, for `gateway_build_info{git_sha}` and
//! `--version`-style reporting. `GATEWAY_GIT_SHA` in the build environment wins (image builds
//! without `.git`); otherwise `git rev-parse`, or "unknown".
fn main() {
    println!("cargo:rerun-if-env-changed=GATEWAY_GIT_SHA");
    let sha = std::env::var("GATEWAY_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    // Rebuild when HEAD moves (a commit or a checkout), when there is a .git to watch: HEAD,
    // and the ref of the branch it names, not the whole refs/heads folder (whose time stamp
    // moves with a commit on ANY branch, which rebuilt this crate for work on other branches).
    let mut watch = vec![".git/HEAD".to_string(), ".git/packed-refs".to_string()];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            watch.push(format!(".git/{branch}"));
        }
    }
    for path in watch {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!(
        "cargo:rustc-env=GATEWAY_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".into())
    );
}
