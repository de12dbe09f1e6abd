//! `kaizen_health`: the health monitor. Every few seconds it reads the
//! node's resident memory and, above 80 % of `kaizen.memory_limit_mb`,
//! raises the `memory_high` alert (SPEC §8: yellow); below 70 % it resolves
//! it (the gap keeps a node near the line from flapping).

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tai_core::alert::{Alert, Severity};
use tracing::warn;

pub const KAIZEN_HEALTH: &str = "kaizen_health";
const RAISE_AT: f64 = 0.80;
const RESOLVE_BELOW: f64 = 0.70;

#[derive(Clone, Copy, Debug)]
pub struct Health;

pub struct HealthArgs {
    pub memory_limit_bytes: u64,
    pub every: Duration,
}

pub struct HealthState {
    limit: u64,
    high: bool,
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

fn mb(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
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
        let ticker = myself.send_interval(args.every, || HealthMsg::Tick);
        Ok(HealthState {
            limit: args.memory_limit_bytes,
            high: false,
            ticker,
        })
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
        if st.limit == 0 {
            return Ok(());
        }
        let Some(rss) = rss_bytes() else {
            return Ok(());
        };
        let share = rss as f64 / st.limit as f64;
        let alert = |summary: String| {
            Alert::new(
                Severity::Warning,
                "memory_high",
                "memory_high",
                KAIZEN_HEALTH,
                summary,
            )
        };
        if !st.high && share > RAISE_AT {
            st.high = true;
            warn!(rss_mb = mb(rss), limit_mb = mb(st.limit), "memory high");
            tai_core::alert::raise(alert(format!(
                "resident memory {} MB is {:.0} % of the {} MB limit",
                mb(rss),
                share * 100.0,
                mb(st.limit)
            )));
        } else if st.high && share < RESOLVE_BELOW {
            st.high = false;
            tai_core::alert::raise(
                alert(format!(
                    "resident memory back to {} MB of {} MB",
                    mb(rss),
                    mb(st.limit)
                ))
                .resolved(),
            );
        }
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
}
