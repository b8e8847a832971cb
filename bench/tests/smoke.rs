//! The benchmark program runs end to end in `--quick` mode against the local services. This
//! checks that it runs and prints its table; it never judges a timing.

use std::process::Command;

#[test]
fn quick_benchmark_runs_and_prints_the_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-bench"))
        .arg("--quick")
        .output()
        .expect("run outbox-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "outbox-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for section in [
        "relay throughput",
        "write path",
        "latency",
        "backlog scale",
        "memory",
        "broker drain",
        "| inbox |",
        "minimal raw_outbox loop",
        "one event per aggregate",
        "delete on publish",
        "tx with the minimal raw_outbox INSERT",
        "| scheduled delivery |",
        "| log relay |",
        "tx with Outbox::emit (message mode)",
        "message-mode events to the no-op sink",
        "| group |",
    ] {
        assert!(stdout.contains(section), "no {section} rows in:\n{stdout}");
    }
    assert!(stdout.contains("targets met"), "{stdout}");
}
