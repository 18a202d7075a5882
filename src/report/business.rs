//! Sections about the business: K-means clusters, channels (LTV against CAC), cohorts
//! (retention heat map, cumulative value curves and payback).

use std::collections::BTreeMap;

use super::charts::{self, Heatmap, Lines, Series};
use super::data::{Tables, ident};
use super::html::{Fmt, Section, Table, decimal, esc, int, pct};
use crate::error::Result;

/// Size and feature profile per cluster.
pub async fn clusters(t: &Tables, _f: &Fmt) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["cluster", "size", "share"]) else {
        return Ok(None);
    };
    let means: Vec<String> = tab
        .columns
        .iter()
        .filter(|c| c.starts_with("mean_"))
        .cloned()
        .collect();
    let mut cols = vec!["cluster".to_string(), "size".into(), "share".into()];
    cols.extend(means.iter().cloned());
    let rows = t
        .query(&format!(
            "SELECT {} FROM {} ORDER BY cluster",
            cols.join(", "),
            ident(&tab.name)
        ))
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("cluster {}", r[0].num().unwrap_or(0.0) as i64))
        .collect();
    let sizes: Vec<f64> = rows.iter().map(|r| r[1].num().unwrap_or(0.0)).collect();
    let mut body = String::from("<div class=\"charts\">");
    body.push_str(&charts::hbars(
        "Customers per cluster",
        &labels,
        &sizes,
        "customers",
        &|v| int(v),
    )?);
    if !means.is_empty() {
        // Each feature shaded by its own range, so features of different units compare.
        let feature_names: Vec<String> = means
            .iter()
            .map(|m| m.trim_start_matches("mean_").replace('_', " "))
            .collect();
        let mut shade = vec![vec![None; means.len()]; rows.len()];
        let mut text = vec![vec![None; means.len()]; rows.len()];
        for j in 0..means.len() {
            let vals: Vec<f64> = rows
                .iter()
                .map(|r| r[3 + j].num().unwrap_or(f64::NAN))
                .collect();
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for (i, v) in vals.iter().enumerate() {
                shade[i][j] = Some(if hi > lo { (v - lo) / (hi - lo) } else { 0.5 });
                text[i][j] = Some(decimal(*v, if v.abs() >= 100.0 { 0 } else { 1 }));
            }
        }
        body.push_str(&charts::heatmap(&Heatmap {
            title: "Cluster profiles: mean of each feature (shaded within the feature)",
            x_label: "feature (in its own units)",
            y_label: "cluster",
            cols: feature_names,
            rows: labels.clone(),
            text,
            shade,
        })?);
    }
    body.push_str("</div>");
    let heads: Vec<String> = cols.iter().map(|c| c.replace('_', " ")).collect();
    let head_refs: Vec<&str> = heads.iter().map(String::as_str).collect();
    let mut table = Table::new("clusters", &head_refs);
    for r in &rows {
        let mut cells = vec![
            int(r[0].num().unwrap_or(0.0)),
            int(r[1].num().unwrap_or(0.0)),
            pct(r[2].num().unwrap_or(f64::NAN)),
        ];
        cells.extend(
            r[3..]
                .iter()
                .map(|c| decimal(c.num().unwrap_or(f64::NAN), 2)),
        );
        table.row(&[], &cells);
    }
    body.push_str(&table.html());
    Ok(Some(Section {
        id: "clusters",
        title: "K-means clusters".into(),
        lead: format!("{} clusters of customers by behaviour.", rows.len()),
        body,
        kpis: Vec::new(),
    }))
}

/// LTV vs CAC per channel with the break-even line; the channels below it are named.
pub async fn channels(t: &Tables, f: &Fmt, warnings: &mut Vec<String>) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["acquisition_channel", "avg_ltv", "avg_cac"]) else {
        return Ok(None);
    };
    let has_customers = tab.has("customers");
    let rows = t
        .query(&format!(
            "SELECT acquisition_channel, avg_cac, avg_ltv, {} FROM {} ORDER BY acquisition_channel",
            if has_customers { "customers" } else { "NULL" },
            ident(&tab.name)
        ))
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let points: Vec<(String, f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r[0].text(),
                r[1].num().unwrap_or(0.0),
                r[2].num().unwrap_or(0.0),
            )
        })
        .collect();
    let below: Vec<String> = points
        .iter()
        .filter(|(_, cac, ltv)| ltv < cac)
        .map(|(n, _, _)| n.clone())
        .collect();
    let svg = charts::break_even(
        "Lifetime value against acquisition cost, per channel",
        &points,
        &|v| f.money_short(v),
        &f.unit(),
    )?;
    let mut table = Table::new(
        "channels",
        &[
            "channel",
            "customers",
            "average CAC",
            "average LTV",
            "LTV : CAC",
            "",
        ],
    );
    for (r, (name, cac, ltv)) in rows.iter().zip(&points) {
        table.row(
            &[("channel", name.clone())],
            &[
                esc(name),
                r[3].num().map_or("–".into(), int),
                f.money(*cac),
                f.money(*ltv),
                if *cac > 0.0 {
                    decimal(ltv / cac, 2)
                } else {
                    "–".into()
                },
                if ltv < cac {
                    "below break-even".into()
                } else {
                    String::new()
                },
            ],
        );
    }
    let kpi = if below.is_empty() {
        (
            "none".to_string(),
            "channels below break-even (LTV < CAC)".to_string(),
        )
    } else {
        (below.join(", "), "below break-even: LTV < CAC".to_string())
    };
    let lead = if below.is_empty() {
        "Every channel pays back its acquisition cost.".to_string()
    } else {
        warnings.push(format!(
            "channels below break-even (LTV < CAC): {}",
            below.join(", ")
        ));
        format!(
            "Below break-even (lifetime value less than acquisition cost): {}.",
            below.join(", ")
        )
    };
    Ok(Some(Section {
        id: "channels",
        title: "Channels: LTV against CAC".into(),
        lead,
        body: format!("<div class=\"charts\">{svg}</div>{}", table.html()),
        kpis: vec![kpi],
    }))
}

/// The retention heat map (acquisition month × months since) and the cumulative value curves
/// per channel with their CAC and payback.
pub async fn cohorts(t: &Tables, f: &Fmt) -> Result<Option<Section>> {
    let retention = t.find(&["cohort_month", "month_number", "retention_rate"]);
    let curves = t.find(&[
        "cohort_month",
        "acquisition_channel",
        "days",
        "gross_profit_per_customer",
    ]);
    if retention.is_none() && curves.is_none() {
        return Ok(None);
    }
    let mut body = String::from("<div class=\"charts\">");
    let mut lead = Vec::new();
    if let Some(tab) = retention {
        // The latest 24 cohorts, their first 24 months.
        let rows = t
            .query(&format!(
                "SELECT cast(cohort_month AS varchar), month_number, retention_rate FROM {n}
                 WHERE cohort_month IN (SELECT DISTINCT cohort_month FROM {n} ORDER BY cohort_month DESC LIMIT 24)
                   AND month_number <= 23
                 ORDER BY 1, 2",
                n = ident(&tab.name)
            ))
            .await?;
        let mut months: Vec<String> = rows.iter().map(|r| r[0].text()).collect();
        months.dedup();
        let width = rows.iter().filter_map(|r| r[1].num()).fold(0.0, f64::max) as usize + 1;
        let mut shade = vec![vec![None; width]; months.len()];
        for r in &rows {
            let (Some(i), Some(m)) = (months.iter().position(|x| *x == r[0].text()), r[1].num())
            else {
                continue;
            };
            shade[i][m as usize] = r[2].num();
        }
        let text = shade
            .iter()
            .map(|row| {
                row.iter()
                    .map(|v| v.map(|x| format!("{:.0}", x * 100.0)))
                    .collect()
            })
            .collect();
        // Month 0 is 100 % by definition for most cohorts; shade the rest on their own scale.
        let top = shade
            .iter()
            .flat_map(|r| r.iter().skip(1))
            .flatten()
            .copied()
            .fold(0.0, f64::max)
            .max(1e-9);
        let scaled = shade
            .iter()
            .map(|row| row.iter().map(|v| v.map(|x| (x / top).min(1.0))).collect())
            .collect();
        body.push_str(&charts::heatmap(&Heatmap {
            title: "Retention: % of each acquisition cohort active per month",
            x_label: "months since acquisition",
            y_label: "acquisition month",
            cols: (0..width).map(|m| m.to_string()).collect(),
            rows: months.clone(),
            text,
            shade: scaled,
        })?);
        lead.push(format!("retention of the latest {} cohorts", months.len()));
    }
    let mut payback_table = String::new();
    if let Some(tab) = curves {
        let n = ident(&tab.name);
        let has_cac = tab.has("cac");
        let rows = t
            .query(&format!(
                "SELECT acquisition_channel, days,
                        sum(gross_profit_per_customer * customers) / sum(customers) AS gp,
                        {} AS cac
                 FROM {n} WHERE gross_profit_per_customer IS NOT NULL
                 GROUP BY 1, 2 ORDER BY 1, 2",
                if has_cac { "max(cac)" } else { "NULL" }
            ))
            .await?;
        // Per channel: its curve (day, gross profit per customer) and its CAC.
        type Curve = (Vec<(f64, f64)>, Option<f64>);
        let mut by_channel: BTreeMap<String, Curve> = BTreeMap::new();
        for r in &rows {
            let e = by_channel.entry(r[0].text()).or_default();
            if let (Some(d), Some(v)) = (r[1].num(), r[2].num()) {
                e.0.push((d, v));
            }
            e.1 = e.1.or(r[3].num());
        }
        let xmax = rows.iter().filter_map(|r| r[1].num()).fold(1.0, f64::max);
        let ymax = rows
            .iter()
            .flat_map(|r| [r[2].num(), r[3].num()])
            .flatten()
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.1;
        let mut series = Vec::new();
        for (i, (ch, (points, cac))) in by_channel.iter().enumerate() {
            series.push(Series {
                name: ch.clone(),
                points: points.clone(),
                color: charts::color(i),
                dashed: false,
                dots: true,
            });
            if let Some(c) = cac {
                series.push(Series {
                    name: String::new(),
                    points: vec![(0.0, *c), (xmax, *c)],
                    color: charts::color(i),
                    dashed: true,
                    dots: false,
                });
            }
        }
        let unit = f.unit();
        body.push_str(&charts::lines(&Lines {
            title: "Cumulative gross profit per acquired customer; dashed: the channel's CAC",
            x_label: "days since acquisition",
            y_label: &format!("gross profit per customer ({unit})"),
            x: 0.0..xmax * 1.02,
            y: 0.0..ymax,
            x_fmt: &|v| format!("{v:.0}"),
            y_fmt: &|v| f.money_short(v),
            series,
            marks: Vec::new(),
            legend_lower_right: true,
        })?);
        if tab.has("payback_day") && tab.has("below_cac") {
            let rows = t
                .query(&format!(
                    "SELECT acquisition_channel, count(DISTINCT cohort_month) AS cohorts,
                            count(DISTINCT CASE WHEN payback_day IS NOT NULL THEN cohort_month END) AS paid_back,
                            median(payback_day) AS median_payback,
                            count(DISTINCT CASE WHEN below_cac THEN cohort_month END) AS below
                     FROM {n} GROUP BY 1 ORDER BY 1"
                ))
                .await?;
            let mut table = Table::new(
                "payback",
                &[
                    "channel",
                    "cohorts",
                    "paid back",
                    "median payback day",
                    "cohorts predicted below CAC at 365 days",
                ],
            );
            for r in &rows {
                table.row(
                    &[("channel", r[0].text())],
                    &[
                        esc(&r[0].text()),
                        int(r[1].num().unwrap_or(0.0)),
                        int(r[2].num().unwrap_or(0.0)),
                        r[3].num().map_or("not yet".into(), int),
                        int(r[4].num().unwrap_or(0.0)),
                    ],
                );
            }
            payback_table = format!("<h3>Payback per channel</h3>{}", table.html());
        }
        lead.push("value curves per channel against their acquisition cost".into());
    }
    body.push_str("</div>");
    body.push_str(&payback_table);
    Ok(Some(Section {
        id: "cohorts",
        title: "Cohorts".into(),
        lead: format!("{}.", capitalise(&lead.join("; "))),
        body,
        kpis: Vec::new(),
    }))
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
