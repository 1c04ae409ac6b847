//! `[backup] schedule` (`daily HH:MM` UTC, or `every N` with N in `s`, `m` or `h`): the node
//! backs up to every target at that time, and logs a warning when a target's last success (the
//! replicated record, so it survives restarts) is older than twice the schedule's period.
//! Two nodes with the same schedule do not both back up: the lease refuses the second.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{now_secs, target, BackupConfig, Jobs, Progress};
use crate::store::MailStore;

const DAY_SECS: i64 = 86_400;
/// How often the age of the last backups is checked at most (more often for short periods).
const AGE_CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// The shortest `every` period.
const MIN_PERIOD_SECS: i64 = 1;

/// When backups run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every day at this many seconds after midnight UTC.
    Daily { at_secs: i64 },
    /// Every this many seconds from the node's start.
    Every { period_secs: i64 },
}

impl Schedule {
    pub fn period_secs(&self) -> i64 {
        match self {
            Schedule::Daily { .. } => DAY_SECS,
            Schedule::Every { period_secs } => *period_secs,
        }
    }

    /// The next run strictly after `now` (Unix seconds).
    pub fn next_run(&self, now: i64) -> i64 {
        match self {
            Schedule::Daily { at_secs } => next_run(now, *at_secs),
            Schedule::Every { period_secs } => now + period_secs,
        }
    }
}

/// Parses `daily HH:MM` or `every N(s|m|h)`.
pub fn parse(text: &str) -> Result<Schedule, String> {
    let bad = || format!("backup schedule {text:?} is neither `daily HH:MM` nor `every N(s|m|h)`");
    if let Some(every) = text.trim().strip_prefix("every") {
        let every = every.trim();
        let (number, unit) = every.split_at(every.len().saturating_sub(1));
        let number: i64 = number.trim().parse().map_err(|_| bad())?;
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        let period_secs = number.checked_mul(unit).ok_or_else(bad)?;
        if period_secs < MIN_PERIOD_SECS {
            return Err(bad());
        }
        return Ok(Schedule::Every { period_secs });
    }
    parse_schedule(text).map(|at_secs| Schedule::Daily { at_secs })
}

/// Seconds after midnight UTC of `daily HH:MM`.
pub fn parse_schedule(text: &str) -> Result<i64, String> {
    let bad = || format!("backup schedule {text:?} is not `daily HH:MM`");
    let time = text.trim().strip_prefix("daily").ok_or_else(bad)?.trim();
    let (hours, minutes) = time.split_once(':').ok_or_else(bad)?;
    let hours: i64 = hours.parse().map_err(|_| bad())?;
    let minutes: i64 = minutes.parse().map_err(|_| bad())?;
    if !(0..24).contains(&hours) || !(0..60).contains(&minutes) {
        return Err(bad());
    }
    Ok(hours * 3600 + minutes * 60)
}

/// The next run strictly after `now` (Unix seconds).
pub fn next_run(now: i64, at_secs: i64) -> i64 {
    let today = now - now.rem_euclid(DAY_SECS) + at_secs;
    if today > now {
        today
    } else {
        today + DAY_SECS
    }
}

pub async fn run(
    store: MailStore,
    config: BackupConfig,
    node: String,
    jobs: Arc<Jobs>,
    cluster: Option<kermail_cluster::Cluster>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(text) = config.schedule.clone() else {
        return Ok(());
    };
    let schedule = match parse(&text) {
        Ok(schedule) => schedule,
        Err(error) => {
            tracing::error!(%error, "backups are not scheduled");
            return Ok(());
        }
    };
    let period = schedule.period_secs();
    let check_every = AGE_CHECK_INTERVAL.min(Duration::from_secs(
        u64::try_from((period / 2).max(1)).unwrap_or(1),
    ));
    let started = now_secs();
    let mut next = schedule.next_run(started);
    loop {
        let now = now_secs();
        let wait = Duration::from_secs(u64::try_from(next - now).unwrap_or(0)).min(check_every);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        let now = now_secs();
        if now >= next {
            for target_config in &config.targets {
                match target::open(target_config, cluster.as_ref()) {
                    Ok(target) => {
                        let _ = jobs
                            .run_recorded(
                                &store,
                                &config,
                                target_config,
                                target.as_ref(),
                                &node,
                                &Progress::default(),
                            )
                            .await;
                    }
                    Err(error) => {
                        tracing::warn!(target = %target_config.name, %error, "backup target unusable")
                    }
                }
            }
            next = schedule.next_run(now_secs());
        }
        let (_, last) = store.backup_records();
        let now = now_secs();
        for target_config in &config.targets {
            let last = last
                .get(&target_config.name)
                .map(|s| s.at_secs)
                .unwrap_or(started);
            if now - last > 2 * period {
                tracing::warn!(
                    target = %target_config.name,
                    age_s = now - last,
                    period_s = period,
                    "the last successful backup is older than twice its schedule"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_schedules_parse_and_the_next_run_is_later_today_or_tomorrow() {
        assert_eq!(parse_schedule("daily 03:00"), Ok(3 * 3600));
        assert!(parse_schedule("hourly").is_err());
        assert!(parse_schedule("daily 25:00").is_err());
        let midnight = 1_700_006_400 - 1_700_006_400 % DAY_SECS;
        assert_eq!(next_run(midnight + 3600, 3 * 3600), midnight + 3 * 3600);
        assert_eq!(
            next_run(midnight + 4 * 3600, 3 * 3600),
            midnight + DAY_SECS + 3 * 3600
        );
    }

    #[test]
    fn every_schedules_parse() {
        assert_eq!(parse("every 30s"), Ok(Schedule::Every { period_secs: 30 }));
        assert_eq!(parse("every 2h"), Ok(Schedule::Every { period_secs: 7200 }));
        assert_eq!(
            parse("daily 03:00"),
            Ok(Schedule::Daily { at_secs: 3 * 3600 })
        );
        assert!(parse("every 0s").is_err());
        assert!(parse("every 5d").is_err());
        assert!(parse("every").is_err());
    }
}
