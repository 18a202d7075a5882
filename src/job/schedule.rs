//! When a job fires: its `schedule` (cron) in its time zone, as real instants, with daylight
//! saving time handled explicitly.
//!
//! Schedules are written as standard 5-field cron (`30 2 * * *`), a 6-field form with seconds
//! first, or the shorthands `@daily`, `@hourly`, `@weekly`, `@monthly`, `@yearly`; parsed with
//! croner (the parser tokio-cron-scheduler uses). A cron expression describes wall-clock times in the job's time zone. We find the next matching
//! wall-clock time with croner on a plain (zone-less) calendar, then map it to an instant:
//! - a wall-clock time that exists once fires then;
//! - a wall-clock time that occurs twice (the fall-back hour) fires at its first occurrence only;
//! - a wall-clock time that does not exist (the spring-forward gap) fires at the first minute
//!   after the gap (a 02:30 job fires at 03:00 on that day; it is never skipped).
//!
//! The run date of a fire is its wall-clock date in the job's zone.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// A parsed schedule in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    pub tz: Tz,
    pub expr: String,
}

/// One firing of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fire {
    pub at: DateTime<Utc>,
    pub run_date: NaiveDate,
}

/// Parses a cron expression; the error says what to write instead.
fn parse_cron(expr: &str) -> Result<Cron, String> {
    let e = expr.trim();
    let expanded = match e {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other if other.starts_with('@') => {
            return Err(format!(
                "unknown shorthand `{other}`; use @hourly, @daily, @weekly, @monthly, @yearly or 5-field cron"
            ));
        }
        other => other,
    };
    let fields = expanded.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "`{expr}` has {fields} fields; write standard 5-field cron `minute hour day month weekday` (e.g. `30 2 * * *`), or 6 fields with seconds first"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expanded)
        .map_err(|err| format!("`{expr}` is not a valid cron expression: {err}"))
}

impl Schedule {
    /// Parses `expr` in the time zone `tz`; the error says what to write instead.
    pub fn parse(expr: &str, tz: Tz) -> Result<Self, String> {
        Ok(Self {
            cron: parse_cron(expr)?,
            tz,
            expr: expr.to_string(),
        })
    }

    /// The first fire strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<Fire> {
        // Whole seconds: cron times have none, and croner keeps a fraction it is given.
        let mut wall = after
            .with_timezone(&self.tz)
            .naive_local()
            .with_nanosecond(0)
            .unwrap_or_default();
        // At most a few steps: each step moves to a later wall-clock time.
        for _ in 0..8 {
            let next_wall = self.next_wall(wall)?;
            let at = self.instant(next_wall);
            if at > after {
                return Some(Fire {
                    at,
                    run_date: next_wall.date(),
                });
            }
            wall = next_wall;
        }
        None
    }

    /// Every fire in `(after, until]`, oldest first.
    pub fn fires_between(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Vec<Fire> {
        let mut out = Vec::new();
        let mut t = after;
        while let Some(f) = self.next_after(t) {
            if f.at > until {
                break;
            }
            out.push(f);
            t = f.at;
        }
        out
    }

    /// The next matching wall-clock time strictly after `wall`.
    fn next_wall(&self, wall: NaiveDateTime) -> Option<NaiveDateTime> {
        let as_utc = Utc.from_utc_datetime(&wall);
        self.cron
            .find_next_occurrence(&as_utc, false)
            .ok()
            .map(|t| t.naive_utc())
    }

    /// The instant of a wall-clock time, by the rules in the module doc.
    fn instant(&self, wall: NaiveDateTime) -> DateTime<Utc> {
        if let Some(t) = self.tz.from_local_datetime(&wall).earliest() {
            return t.with_timezone(&Utc);
        }
        // In a gap: the first whole minute after it.
        let mut probe = wall;
        for _ in 0..(24 * 60) {
            probe += Duration::minutes(1);
            if let Some(t) = self.tz.from_local_datetime(&probe).earliest() {
                return t.with_timezone(&Utc);
            }
        }
        Utc.from_utc_datetime(&wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn schedule(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, tz.parse().unwrap()).unwrap()
    }

    #[test]
    fn accepts_the_forms_users_write() {
        for ok in [
            "30 2 * * *",
            "0 30 2 * * *",
            "@daily",
            "@hourly",
            "*/5 * * * 1-5",
        ] {
            assert!(parse_cron(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_the_rest_with_a_reason() {
        assert!(parse_cron("30 2 * *").unwrap_err().contains("4 fields"));
        assert!(parse_cron("@sometimes").unwrap_err().contains("shorthand"));
        assert!(parse_cron("61 2 * * *").is_err());
    }

    #[test]
    fn daily_in_utc() {
        let s = schedule("30 2 * * *", "UTC");
        let f = s.next_after(utc("2026-11-22T02:30:00Z")).unwrap();
        assert_eq!(f.at, utc("2026-11-23T02:30:00Z"));
        assert_eq!(f.run_date.to_string(), "2026-11-23");
        assert_eq!(
            s.fires_between(utc("2026-11-20T00:00:00Z"), utc("2026-11-22T03:00:00Z"))
                .len(),
            3
        );
    }

    #[test]
    fn berlin_offsets_follow_dst() {
        let s = schedule("30 2 * * *", "Europe/Berlin");
        // Winter: UTC+1.
        assert_eq!(
            s.next_after(utc("2026-01-10T00:00:00Z")).unwrap().at,
            utc("2026-01-10T01:30:00Z")
        );
        // Summer: UTC+2.
        assert_eq!(
            s.next_after(utc("2026-07-10T00:00:00Z")).unwrap().at,
            utc("2026-07-10T00:30:00Z")
        );
    }

    #[test]
    fn spring_forward_runs_once_after_the_gap() {
        // 2026-03-29: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist.
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let fires = s.fires_between(utc("2026-03-28T12:00:00Z"), utc("2026-03-30T12:00:00Z"));
        let days: Vec<String> = fires.iter().map(|f| f.run_date.to_string()).collect();
        assert_eq!(days, ["2026-03-29", "2026-03-30"]);
        assert_eq!(fires[0].at, utc("2026-03-29T01:00:00Z")); // 03:00 CEST
        assert_eq!(fires[1].at, utc("2026-03-30T00:30:00Z")); // 02:30 CEST
    }

    #[test]
    fn fall_back_runs_once_at_the_first_occurrence() {
        // 2026-10-25: Berlin clocks go back from 03:00 to 02:00; 02:30 happens twice.
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let fires = s.fires_between(utc("2026-10-24T12:00:00Z"), utc("2026-10-26T12:00:00Z"));
        let days: Vec<String> = fires.iter().map(|f| f.run_date.to_string()).collect();
        assert_eq!(days, ["2026-10-25", "2026-10-26"]);
        assert_eq!(fires[0].at, utc("2026-10-25T00:30:00Z")); // 02:30 CEST, not 02:30 CET
        assert_eq!(fires[1].at, utc("2026-10-26T01:30:00Z")); // 02:30 CET
    }

    #[test]
    fn fires_are_on_whole_seconds() {
        let s = schedule("* * * * *", "UTC");
        let f = s.next_after(utc("2026-11-22T11:47:10.605Z")).unwrap();
        assert_eq!(f.at, utc("2026-11-22T11:48:00Z"));
    }

    #[test]
    fn hourly_shorthand_and_seconds() {
        let s = schedule("@hourly", "UTC");
        assert_eq!(
            s.fires_between(utc("2026-11-22T00:00:00Z"), utc("2026-11-22T05:00:00Z"))
                .len(),
            5
        );
        let s = schedule("*/20 * * * * *", "UTC");
        assert_eq!(
            s.next_after(utc("2026-11-22T00:00:00Z")).unwrap().at,
            utc("2026-11-22T00:00:20Z")
        );
    }
}
