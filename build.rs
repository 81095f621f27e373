//! Records the commit FastGate is built from, for `fastgate version`
//! ("unknown" outside a git checkout, e.g. a source tarball), and rebuilds
//! when the embedded Postgres migrations change.
use std::process::Command;

/// `git` output for `args`, trimmed; None outside a checkout.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let sha = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FASTGATE_GIT_SHA={sha}");
    // Watch the files git really uses: in a worktree `.git` is a file and
    // HEAD lives elsewhere; a path that does not exist would rebuild the
    // crate on every build.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        println!("cargo:rerun-if-changed={common}/refs/heads");
    }
    // The Postgres migrations are embedded (refinery) at compile time.
    println!("cargo:rerun-if-changed=migrations");
}
