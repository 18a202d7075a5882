//! The run report: rendered in a real headless Chromium (installed by `scripts/test`), its
//! numbers compared with the committed output tables as DuckDB reads them, self-contained,
//! driven by which tables a job wrote, and never written by a failed run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::*;

const PAGE: &str = "data/reports/customer_value/run_date=2026-11-22/report.html";

fn chromium() -> String {
    std::env::var("CLVFLOW_TEST_CHROMIUM").unwrap_or_else(|_| {
        panic!("CLVFLOW_TEST_CHROMIUM is not set: run the tests with ./scripts/test (it installs Chromium)")
    })
}

/// Chromium as the machine allows it headless (no sandbox as root, no network chatter).
fn browser(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The page as the browser built it (its DOM), and what the browser logged.
fn dom(page: &Path, profile: &Path) -> (String, String) {
    let out = browser(profile)
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --dump-dom failed:\n{}",
        show(&out)
    );
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Screenshot of the page: its size and how many distinct colours it has.
fn screenshot(page: &Path, profile: &Path, png: &Path) -> (u64, u64, u64) {
    let out = browser(profile)
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1280,2400")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --screenshot failed:\n{}",
        show(&out)
    );
    let v = py_json(
        "import sys, json\nfrom PIL import Image\nim = Image.open(sys.argv[1]).convert('RGB')\ncolors = im.getcolors(maxcolors=1 << 24)\nprint(json.dumps([im.size[0], im.size[1], len(colors)]))",
        &[png.to_str().unwrap()],
    );
    (
        v[0].as_u64().unwrap(),
        v[1].as_u64().unwrap(),
        v[2].as_u64().unwrap(),
    )
}

/// Console messages the page caused at level error (Chromium logs them as `CONSOLE`).
fn console_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Every `data-<a>` and `data-<b>` pair of the rows that have both, in the DOM.
fn data_pairs(dom: &str, a: &str, b: &str) -> Vec<(String, String)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let key = format!("data-{name}=\"");
        let start = tag.find(&key)? + key.len();
        let end = tag[start..].find('"')? + start;
        Some(unescape(&tag[start..end]))
    };
    dom.split("<tr")
        .skip(1)
        .filter_map(|t| {
            let tag = &t[..t.find('>').unwrap_or(t.len())];
            Some((attr(tag, a)?, attr(tag, b)?))
        })
        .collect()
}

/// What a page may not contain: anything loaded from elsewhere.
fn assert_self_contained(html: &str) {
    for needle in [
        "http://", "https://", "src=\"//", "src='//", "@import", "url(",
    ] {
        assert!(!html.contains(needle), "the page references `{needle}`");
    }
    assert!(!html.contains("<script"), "the page has a script");
    for href in html.split("href=\"").skip(1) {
        assert!(
            href.starts_with('#'),
            "a link leaves the page: {}",
            &href[..40.min(href.len())]
        );
    }
}

#[test]
fn the_customer_value_report_renders_in_a_browser_and_shows_the_tables_numbers() {
    let p = TestProject::shipped();
    p.generate(3000);
    let out = p.run();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "report file://./data/reports/customer_value/run_date=2026-11-22/report.html"
        ),
        "the run summary names its report:\n{}",
        show(&out)
    );
    let page = p.file(PAGE);
    let html = std::fs::read_to_string(&page).unwrap();
    assert_self_contained(&html);

    let profile = tempfile::tempdir().unwrap();
    let (w, h, colors) = screenshot(&page, profile.path(), &p.file("report.png"));
    assert_eq!((w, h), (1280, 2400));
    assert!(colors > 50, "the screenshot is blank ({colors} colours)");
    let (dom, log) = dom(&page, profile.path());
    assert!(
        console_errors(&log).is_empty(),
        "console: {:?}",
        console_errors(&log)
    );
    for title in [
        "At a glance",
        "Run facts",
        "RFM segments",
        "Value concentration",
        "CLV distribution and top customers",
        "Who is about to leave",
        "Model fit",
        "Calibration vs holdout",
        "K-means clusters",
        "Channels: LTV against CAC",
        "Cohorts",
    ] {
        assert!(
            dom.contains(&format!(">{title}<")),
            "no section `{title}` in the DOM"
        );
    }
    assert!(dom.matches("<svg").count() >= 10, "charts missing");

    // Segment counts, as DuckDB reads the committed table.
    let shown: BTreeMap<String, i64> = data_pairs(&dom, "segment", "customers")
        .into_iter()
        .map(|(s, n)| (s, n.parse().unwrap()))
        .collect();
    let want: BTreeMap<String, i64> = duckdb(
        p.path(),
        "select segment, count(*) from read_parquet('data/marts/customer_value/*/*/*.parquet', hive_partitioning = true) where run_date = '2026-11-22' group by segment",
    )
    .into_iter()
    .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
    .collect();
    assert_eq!(shown, want);
    assert!(shown.len() >= 5, "{shown:?}");

    // Tier shares, as DuckDB reads value_tiers.
    let customer_shares: BTreeMap<String, f64> = data_pairs(&dom, "tier", "customer-share")
        .into_iter()
        .map(|(t, v)| (t, v.parse().unwrap()))
        .collect();
    let value_shares: BTreeMap<String, f64> = data_pairs(&dom, "tier", "value-share")
        .into_iter()
        .map(|(t, v)| (t, v.parse().unwrap()))
        .collect();
    let tiers = duckdb(
        p.path(),
        "select value_tier, customer_share, predicted_value_share from read_parquet('data/marts/value_tiers/*/*.parquet', hive_partitioning = true) where run_date = '2026-11-22'",
    );
    assert_eq!(tiers.len(), customer_shares.len());
    for r in &tiers {
        let t = r[0].as_str().unwrap();
        assert!((customer_shares[t] - f64_of(&r[1])).abs() < 1e-9, "{t}");
        assert!((value_shares[t] - f64_of(&r[2])).abs() < 1e-9, "{t}");
    }
    // The page's headline number is the tier table's.
    let top = tiers.iter().find(|r| r[0] == "top_20").unwrap();
    let top_share = format!("{:.1} %", f64_of(&top[2]) * 100.0);
    assert!(
        dom.contains(&top_share),
        "the top-20 % share {top_share} is not shown"
    );

    // Rebuilt from the committed tables and the history alone: the same page.
    p.ok(&[
        "report",
        "customer_value",
        "--date",
        RUN_DATE,
        "--out",
        "rebuilt.html",
    ]);
    assert_eq!(p.read("rebuilt.html"), html);
}

#[test]
fn a_job_without_model_outputs_gets_a_report_without_model_sections() {
    let p = TestProject::shipped();
    p.generate(800);
    p.ok(&["run", "channel_cohort", "--date", RUN_DATE]);
    let page = p.file("data/reports/channel_cohort/run_date=2026-11-22/report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert_self_contained(&html);
    let profile = tempfile::tempdir().unwrap();
    let (dom, log) = dom(&page, profile.path());
    assert!(
        console_errors(&log).is_empty(),
        "console: {:?}",
        console_errors(&log)
    );
    assert!(
        dom.contains(">Run facts<") && dom.contains(">Cohorts<"),
        "{dom}"
    );
    for absent in [
        "Model fit",
        "Who is about to leave",
        "Value concentration",
        "RFM segments",
        "K-means clusters",
    ] {
        assert!(
            !dom.contains(&format!(">{absent}<")),
            "`{absent}` shown without its table"
        );
    }
    assert!(
        dom.contains("Retention"),
        "the retention heat map is missing"
    );
}

#[test]
fn a_failed_run_writes_no_report_and_keeps_the_last_one() {
    let p = TestProject::shipped();
    p.generate(600);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let before = p.read(PAGE);

    let failed = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", "after-staging:error")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{}", show(&failed));
    assert_eq!(p.read(PAGE), before, "a failed rerun replaced the report");

    let failed = p
        .command(&["run", "customer_value", "--date", "2026-11-23"])
        .env("CLVFLOW_FAILPOINT", "after-staging:error")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{}", show(&failed));
    assert!(
        !p.file("data/reports/customer_value/run_date=2026-11-23")
            .exists(),
        "a failed run wrote a report"
    );
    assert_eq!(p.read(PAGE), before);
    // Nor can one be rebuilt for the date that never committed.
    let out = p.clvflow(&[
        "report",
        "customer_value",
        "--date",
        "2026-11-23",
        "--out",
        "x.html",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains("no committed output rows for 2026-11-23"),
        "{}",
        show(&out)
    );
    assert!(!p.file("x.html").exists());
}

#[test]
fn segment_moves_since_the_previous_run_date_match_duckdb() {
    let p = TestProject::shipped();
    p.generate(1500);
    p.ok(&["run", "customer_value", "--date", "2026-11-01"]);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let html = p.read(PAGE);
    assert!(html.contains("Moves since 2026-11-01"), "no segment moves");
    // Customers who kept their segment, as DuckDB counts them on the committed table.
    let rows = duckdb(
        p.path(),
        "with t as (select * from read_parquet('data/marts/customer_value/*/*/*.parquet', hive_partitioning = true)),
              a as (select customer_id, segment from t where run_date = '2026-11-01'),
              b as (select customer_id, segment from t where run_date = '2026-11-22')
         select count(*) filter (where a.segment = b.segment), count(*)
         from a full outer join b on a.customer_id = b.customer_id",
    );
    let (stayed, all) = (rows[0][0].as_i64().unwrap(), rows[0][1].as_i64().unwrap());
    assert!(stayed > 0 && stayed < all, "{rows:?}");
    let want = format!("{} of {} customers", group(stayed), group(all));
    assert!(html.contains(&want), "`{want}` is not on the page");
}

/// `1234` → `1,234`, as the page writes counts.
fn group(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
