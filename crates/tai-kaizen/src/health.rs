//! `kaizen_health`: the health monitor. Every few seconds it reads the
//! node's resident memory and, above 80 % of `kaizen.memory_limit_mb`,
//! raises the `memory_high` alert (SPEC §8: yellow); below 70 % it resolves
//! it (the gap keeps a node near the line from flapping). It reads the
//! space left on the filesystem that holds the data dir too
//! (`tai_disk_free_bytes`): below `kaizen.disk_free_min_mb` it raises
//! `disk_low`, resolved once a quarter more than that is free again. A
//! node whose store finds the disk full stops (exit 1), so this is the
//! warning before that.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::alert::{Alert, Severity};
use tai_core::telemetry as t;
use tracing::warn;

pub const KAIZEN_HEALTH: &str = "kaizen_health";
/// Memory above this share of its limit is high (SPEC §8: yellow).
pub(crate) const RAISE_AT: f64 = 0.80;
const RESOLVE_BELOW: f64 = 0.70;

#[derive(Clone, Copy, Debug)]
pub struct Health;

#[derive(Clone, Debug)]
pub struct HealthArgs {
    /// 0: no memory check.
    pub memory_limit_bytes: u64,
    /// 0: no disk alert (the gauges are still set).
    pub disk_free_min_bytes: u64,
    pub data_dir: PathBuf,
    pub every: Duration,
}

pub struct HealthState {
    args: HealthArgs,
    memory_high: bool,
    disk_low: bool,
    ticker: tokio::task::JoinHandle<()>,
}

pub enum HealthMsg {
    Tick,
}

/// Resident memory of this process (`VmRSS` of /proc/self/status).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Space on a filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    /// What an unprivileged writer may still use (`f_bavail`).
    pub free: u64,
    pub total: u64,
}

/// Space on the filesystem that holds `path` (`statvfs`).
pub fn disk(path: &Path) -> Option<Disk> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(Disk {
        free: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// What the health report judges, read now.
#[derive(Clone, Copy, Debug)]
pub struct Readings {
    pub rss_bytes: Option<u64>,
    pub memory_limit_mb: u64,
    pub disk: Option<Disk>,
    pub disk_free_min_mb: u64,
}

/// The readings of a node run by `config`.
pub fn readings(config: &tai_core::config::Config) -> Readings {
    Readings {
        rss_bytes: rss_bytes(),
        memory_limit_mb: config.kaizen.memory_limit_mb,
        disk: disk(&config.node.data_dir),
        disk_free_min_mb: config.kaizen.disk_free_min_mb,
    }
}

pub(crate) fn mb(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

fn alert(kind: &str, summary: String) -> Alert {
    Alert::new(Severity::Warning, kind, kind, KAIZEN_HEALTH, summary)
}

impl HealthState {
    fn check_memory(&mut self) {
        let limit = self.args.memory_limit_bytes;
        if limit == 0 {
            return;
        }
        let Some(rss) = rss_bytes() else {
            return;
        };
        let share = rss as f64 / limit as f64;
        if !self.memory_high && share > RAISE_AT {
            self.memory_high = true;
            warn!(rss_mb = mb(rss), limit_mb = mb(limit), "memory high");
            tai_core::alert::raise(alert(
                "memory_high",
                format!(
                    "resident memory {} MB is {:.0} % of the {} MB limit",
                    mb(rss),
                    share * 100.0,
                    mb(limit)
                ),
            ));
        } else if self.memory_high && share < RESOLVE_BELOW {
            self.memory_high = false;
            tai_core::alert::raise(
                alert(
                    "memory_high",
                    format!("resident memory back to {} MB of {} MB", mb(rss), mb(limit)),
                )
                .resolved(),
            );
        }
    }

    /// The data dir's disk, read now into its gauges.
    fn disk_gauges(&self) -> Option<Disk> {
        let d = disk(&self.args.data_dir)?;
        metrics::gauge!(t::DISK_FREE).set(d.free as f64);
        metrics::gauge!(t::DISK_TOTAL).set(d.total as f64);
        Some(d)
    }

    fn check_disk(&mut self) {
        let Some(d) = self.disk_gauges() else {
            return;
        };
        let min = self.args.disk_free_min_bytes;
        if min == 0 {
            return;
        }
        let dir = self.args.data_dir.display();
        if !self.disk_low && d.free < min {
            self.disk_low = true;
            warn!(free_mb = mb(d.free), min_mb = mb(min), data_dir = %dir, "disk space low");
            tai_core::alert::raise(alert(
                "disk_low",
                format!(
                    "{} MB free on the disk of {dir}, below kaizen.disk_free_min_mb = {}: the node stops when a write finds it full",
                    mb(d.free),
                    mb(min)
                ),
            ));
        } else if self.disk_low && d.free > min.saturating_add(min / 4) {
            self.disk_low = false;
            tai_core::alert::raise(
                alert(
                    "disk_low",
                    format!("{} MB free on the disk of {dir} again", mb(d.free)),
                )
                .resolved(),
            );
        }
    }
}

impl Actor for Health {
    type Msg = HealthMsg;
    type State = HealthState;
    type Arguments = HealthArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HealthMsg>,
        args: HealthArgs,
    ) -> Result<HealthState, ActorProcessingErr> {
        // The first check one period in: `andon_alerts` starts after this
        // layer, and an alert raised before it runs is only logged. The
        // gauges from the start.
        let ticker = myself.send_interval(args.every, || HealthMsg::Tick);
        let st = HealthState {
            args,
            memory_high: false,
            disk_low: false,
            ticker,
        };
        st.disk_gauges();
        Ok(st)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<HealthMsg>,
        st: &mut HealthState,
    ) -> Result<(), ActorProcessingErr> {
        st.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<HealthMsg>,
        msg: HealthMsg,
        st: &mut HealthState,
    ) -> Result<(), ActorProcessingErr> {
        let HealthMsg::Tick = msg;
        st.check_memory();
        st.check_disk();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process_rss() {
        let rss = super::rss_bytes().expect("/proc/self/status");
        assert!(rss > 1024 * 1024, "{rss}");
    }

    #[test]
    fn reads_the_space_on_a_disk_and_none_for_a_path_that_is_not_there() {
        let d = super::disk(std::path::Path::new(".")).expect("statvfs of .");
        assert!(d.total > 0 && d.free <= d.total, "{d:?}");
        assert_eq!(super::disk(std::path::Path::new("/no/such/dir")), None);
    }
}
