//! CPU time spent by the whole machine and by this process over a phase, read from `/proc`
//! (Linux). With the database local and the machine otherwise idle, "machine minus this
//! process" is the database server's share: it shows which side of the wire bounds a figure.

/// Clock ticks per second of `/proc` figures; 100 on every Linux this runs on.
const TICKS: f64 = 100.0;

#[derive(Clone, Copy)]
pub(crate) struct CpuMeter {
    machine: u64,
    process: u64,
}

/// CPU per event over a phase, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuPerEvent {
    pub(crate) server_us: f64,
    pub(crate) client_us: f64,
}

impl CpuMeter {
    /// `None` where `/proc` is not readable.
    pub(crate) fn start() -> Option<Self> {
        Some(Self {
            machine: machine_busy()?,
            process: process_busy()?,
        })
    }

    pub(crate) fn per_event(self, events: u64) -> Option<CpuPerEvent> {
        let machine = machine_busy()?.saturating_sub(self.machine);
        let process = process_busy()?.saturating_sub(self.process);
        let us = |ticks: u64| ticks as f64 / TICKS * 1e6 / events.max(1) as f64;
        Some(CpuPerEvent {
            server_us: us(machine.saturating_sub(process)),
            client_us: us(process),
        })
    }
}

impl std::fmt::Display for CpuPerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU/event: server {:.1} µs, client {:.1} µs",
            self.server_us, self.client_us
        )
    }
}

/// Busy ticks of all CPUs: user, nice, system, irq, softirq, steal.
fn machine_busy() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?)
}

/// This process's user + system ticks.
fn process_busy() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of this process in MiB (0 where `/proc` is not readable).
pub(crate) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
