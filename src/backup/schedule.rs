//! `[backup] schedule = "daily HH:MM"` (UTC): the node backs up to every target at that time,
//! and logs a warning when a target's last success is older than twice the schedule (two days).
//! Two nodes with the same schedule do not both back up: the lease refuses the second.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{now_secs, target, BackupConfig, Jobs, Progress};
use crate::store::MailStore;

const DAY_SECS: i64 = 86_400;
/// How often the age of the last backups is checked.
const AGE_CHECK_INTERVAL: Duration = Duration::from_secs(600);

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
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Some(schedule) = config.schedule.clone() else {
        return Ok(());
    };
    let at_secs = match parse_schedule(&schedule) {
        Ok(at) => at,
        Err(error) => {
            tracing::error!(%error, "backups are not scheduled");
            return Ok(());
        }
    };
    let started = now_secs();
    let mut next = next_run(started, at_secs);
    loop {
        let now = now_secs();
        let wait =
            Duration::from_secs(u64::try_from(next - now).unwrap_or(0)).min(AGE_CHECK_INTERVAL);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        let now = now_secs();
        if now >= next {
            next = next_run(now, at_secs);
            for target_config in &config.targets {
                match target::open(target_config) {
                    Ok(target) => {
                        let _ = jobs
                            .run_recorded(
                                &store,
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
        }
        for target_config in &config.targets {
            let last = jobs.last_success(&target_config.name).unwrap_or(started);
            if now - last > 2 * DAY_SECS {
                tracing::warn!(
                    target = %target_config.name,
                    age_s = now - last,
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
}
