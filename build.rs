//! Records the commit FastGate is built from, for `fastgate version`
//! ("unknown" outside a git checkout, e.g. a source tarball), and rebuilds
//! when the embedded Postgres migrations change.
use std::process::Command;

fn main() {
    let sha = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FASTGATE_GIT_SHA={sha}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    // The Postgres migrations are embedded (refinery) at compile time.
    println!("cargo:rerun-if-changed=migrations");
}
