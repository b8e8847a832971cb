//! A PostgreSQL server of the test's own, for tests that stop and restart the database: initdb
//! into a temporary directory, on a free port. The shared server is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private PostgreSQL 15 cluster; stopped (immediately) when dropped.
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Extra `-c name=value` settings.
    settings: String,
}

/// Where Debian keeps the server binaries, newest first.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("PostgreSQL server binaries not found under {root:?}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a server binary as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

/// Whether this process runs as root, read from `/proc/self/status` (no libc needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    /// initdb and start a server with trust auth on 127.0.0.1 and a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with `wal_level=logical`, shared by the tests of this binary that run at the
    /// same time (each works in its own schema, slot and publication); stopped when the last
    /// one drops it.
    pub fn shared_logical() -> std::sync::Arc<Self> {
        use std::sync::{Arc, Mutex, Weak};
        static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shared.upgrade() {
            return s;
        }
        let s = Arc::new(Self::start_logical());
        *shared = Arc::downgrade(&s);
        s
    }

    /// A server of its own with `wal_level=logical`.
    pub fn start_logical() -> Self {
        Self::start_with(&[
            "wal_level=logical",
            "max_replication_slots=64",
            "max_wal_senders=16",
        ])
    }

    /// [`start`](Self::start) with extra `name=value` server settings.
    pub fn start_with(settings: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = bin_dir();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown the data dir",
            );
        }
        let data = dir.path().join("data");
        let data_s = data.to_str().expect("utf-8 path");
        run(
            as_postgres(
                &bin.join("initdb"),
                &["-D", data_s, "-A", "trust", "-U", "postgres", "--no-sync"],
            ),
            "initdb",
        );
        let server = Self {
            port: free_port(),
            dir,
            bin,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
        };
        server.pg_ctl_start();
        server
    }

    /// What the server has logged so far.
    #[allow(dead_code)]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200{}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let log = self.dir.path().join("server.log").display().to_string();
        run(
            as_postgres(
                &self.bin.join("pg_ctl"),
                &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
            ),
            "pg_ctl start",
        );
    }

    /// Stops the server at once (`immediate`: like a crash, in-flight transactions are lost),
    /// then starts it again on the same port.
    pub fn restart(&self, down_for: std::time::Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.pg_ctl_start();
    }

    /// Stops the server at once (`immediate`, like a crash) and leaves it down.
    pub fn stop(&self) {
        run(
            as_postgres(
                &self.bin.join("pg_ctl"),
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            ),
            "pg_ctl stop",
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
        .output();
    }
}
