//! Schedule expressions as users write them: standard 5-field cron (`30 2 * * *`), a 6-field
//! form with seconds first, and the shorthands `@daily`, `@hourly`, `@weekly`, `@monthly`,
//! `@yearly`. Parsed with croner (the parser tokio-cron-scheduler uses).

use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// Parses a schedule; the error says what to write instead.
pub fn parse(expr: &str) -> Result<Cron, String> {
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

/// Checks a schedule without keeping the parsed form.
pub fn check(expr: &str) -> Result<(), String> {
    parse(expr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_users_write() {
        for ok in [
            "30 2 * * *",
            "0 30 2 * * *",
            "@daily",
            "@hourly",
            "*/5 * * * 1-5",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_the_rest_with_a_reason() {
        assert!(check("30 2 * *").unwrap_err().contains("4 fields"));
        assert!(check("@sometimes").unwrap_err().contains("shorthand"));
        assert!(check("61 2 * * *").is_err());
    }
}
