//! The model-fit section: parameters with standard errors and intervals, likelihood and
//! iterations per fitted component, the candidates of `model: auto`, and the calibration vs
//! holdout chart of the backtest.

use super::charts::{self, Lines, Series};
use super::data::{Tables, ident};
use super::html::{Fmt, Section, Table, decimal, esc, int};
use crate::error::Result;

/// Fit-report rows that are not a parameter.
const STATS: [&str; 6] = [
    "log_likelihood",
    "aic",
    "bic",
    "iterations",
    "customers",
    "hessian_positive_definite",
];

fn is_param(name: &str) -> bool {
    !STATS.contains(&name)
        && !name.ends_with("_se")
        && !name.ends_with("_ci_low")
        && !name.ends_with("_ci_high")
}

/// A value in the fit table: integers whole, others with 4 significant-ish decimals.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        int(v)
    } else if v.abs() >= 1000.0 {
        decimal(v, 1)
    } else {
        format!("{v:.4}")
    }
}

pub async fn fit(t: &Tables, _f: &Fmt, warnings: &mut Vec<String>) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["model", "name", "value"]) else {
        return Ok(None);
    };
    let rows = t
        .query(&format!(
            "SELECT model, name, value FROM {}",
            ident(&tab.name)
        ))
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    // Components in the order they appear: the transaction model, gamma_gamma, backtest, ...
    let mut components: Vec<String> = Vec::new();
    for r in &rows {
        let c = r[0].text();
        if !components.contains(&c) {
            components.push(c);
        }
    }
    let get = |c: &str, n: &str| {
        rows.iter()
            .find(|r| r[0].text() == c && r[1].text() == n)
            .and_then(|r| r[2].num())
    };
    let mut body = String::new();
    let mut fitted = Vec::new();
    for c in components
        .iter()
        .filter(|c| *c != "backtest" && !c.starts_with("candidate_"))
    {
        let mut table = Table::new(
            &format!("fit-{c}"),
            &["parameter", "estimate", "standard error", "95 % interval"],
        );
        for r in rows.iter().filter(|r| r[0].text() == *c) {
            let n = r[1].text();
            if !is_param(&n) {
                continue;
            }
            let v = r[2].num().unwrap_or(f64::NAN);
            let se = get(c, &format!("{n}_se"));
            let ci = get(c, &format!("{n}_ci_low")).zip(get(c, &format!("{n}_ci_high")));
            table.row(
                &[("param", n.clone())],
                &[
                    esc(&n),
                    num(v),
                    se.map_or("–".into(), num),
                    ci.map_or("–".into(), |(a, b)| format!("{} – {}", num(a), num(b))),
                ],
            );
        }
        let stats: Vec<String> = STATS[..5]
            .iter()
            .filter_map(|s| get(c, s).map(|v| format!("{} {}", s.replace('_', " "), num(v))))
            .collect();
        body.push_str(&format!(
            "<h3>{}</h3>{}<p>{}</p>",
            esc(c),
            table.html(),
            esc(&stats.join(" · "))
        ));
        if get(c, "hessian_positive_definite") == Some(0.0) {
            warnings.push(format!(
                "{c}: the Hessian at the optimum is not positive definite, so there are no standard errors; the fit may not be identified"
            ));
            body.push_str("<p class=\"warn\">The Hessian at the optimum is not positive definite: no standard errors, the parameters may not be identified.</p>");
        }
        fitted.push(c.clone());
    }
    let candidates: Vec<&String> = components
        .iter()
        .filter(|c| c.starts_with("candidate_"))
        .collect();
    if !candidates.is_empty() {
        let metrics = [
            "calibration_log_likelihood",
            "calibration_aic",
            "calibration_bic",
            "holdout_actual_purchases",
            "holdout_predicted_purchases",
            "frequency_error",
            "mean_abs_error",
            "rmse",
            "chosen",
        ];
        let head = [
            "model",
            "log-likelihood (calibration)",
            "AIC",
            "BIC",
            "holdout purchases",
            "predicted",
            "frequency error",
            "MAE",
            "RMSE",
            "",
        ];
        let mut table = Table::new("candidates", &head);
        for c in &candidates {
            let mut cells = vec![esc(c.trim_start_matches("candidate_"))];
            for m in metrics {
                cells.push(match (m, get(c, m)) {
                    ("chosen", Some(1.0)) => "chosen".into(),
                    ("chosen", _) if get(c, "fit_failed") == Some(1.0) => "fit failed".into(),
                    ("chosen", _) => String::new(),
                    (_, Some(v)) => num(v),
                    (_, None) => "–".into(),
                });
            }
            table.row(&[], &cells);
        }
        body.push_str("<h3>Models compared on the holdout (model: auto)</h3>");
        body.push_str("<p>Each candidate was fitted on the calibration period; the one with the smallest frequency error (mean absolute gap between predicted and actual holdout purchases, by calibration frequency 0…6, 7+) was refitted on all data.</p>");
        body.push_str(&table.html());
    }
    if components.iter().any(|c| c == "backtest") {
        let mut table = Table::new("backtest", &["measure", "value"]);
        for r in rows.iter().filter(|r| r[0].text() == "backtest") {
            table.row(
                &[],
                &[
                    esc(&r[1].text().replace('_', " ")),
                    num(r[2].num().unwrap_or(f64::NAN)),
                ],
            );
        }
        body.push_str("<h3>Holdout backtest</h3>");
        body.push_str(&table.html());
    }
    body.push_str(&calibration(t).await?);
    let kpis = match (
        get("backtest", "predicted_purchases"),
        get("backtest", "actual_purchases"),
    ) {
        (Some(p), Some(a)) if a > 0.0 => vec![(
            format!("{:+.1} %", (p - a) / a * 100.0),
            format!(
                "model error on the holdout's {} purchases (predicted {})",
                int(a),
                int(p)
            ),
        )],
        _ => Vec::new(),
    };
    Ok(Some(Section {
        id: "model",
        title: "Model fit".into(),
        lead: format!(
            "Fitted: {}. Can the model be trusted? Compare predicted and actual holdout purchases below.",
            fitted.join(", ")
        ),
        body,
        kpis,
    }))
}

/// Mean actual vs predicted holdout purchases by calibration frequency (0…6, 7+).
async fn calibration(t: &Tables) -> Result<String> {
    let Some(tab) = t.find(&["x", "actual_purchases", "predicted_purchases"]) else {
        return Ok(String::new());
    };
    let weeks = if tab.has("holdout_weeks") {
        "max(holdout_weeks)"
    } else {
        "NULL"
    };
    let rows = t
        .query(&format!(
            "SELECT least(x, 7) AS k, avg(actual_purchases), avg(predicted_purchases), count(*), {weeks}
             FROM {} GROUP BY 1 ORDER BY 1",
            ident(&tab.name)
        ))
        .await?;
    if rows.is_empty() {
        return Ok(String::new());
    }
    let series = |i: usize, name: &str, color: usize| Series {
        name: name.into(),
        points: rows
            .iter()
            .filter_map(|r| Some((r[0].num()?, r[i].num()?)))
            .collect(),
        color: charts::color(color),
        dashed: i == 2,
        dots: true,
    };
    let top = rows
        .iter()
        .flat_map(|r| [r[1].num(), r[2].num()])
        .flatten()
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.15;
    let weeks = rows.first().and_then(|r| r[4].num());
    let y_label = match weeks {
        Some(w) => format!("mean purchases in the {w:.0}-week holdout"),
        None => "mean purchases in the holdout".into(),
    };
    let svg = charts::lines(&Lines {
        title: "Calibration vs holdout: actual and predicted purchases",
        x_label: "repeat purchases in the calibration period (7 = 7 or more)",
        y_label: &y_label,
        x: -0.2..7.2,
        y: 0.0..top,
        x_fmt: &|v| {
            if (v - v.round()).abs() < 1e-9 && v >= 0.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        },
        y_fmt: &|v| format!("{v:.2}"),
        series: vec![
            series(1, "actual", 0),
            series(2, "predicted by the model", 1),
        ],
        marks: Vec::new(),
        legend_lower_right: false,
    })?;
    let mut table = Table::new(
        "calibration",
        &[
            "calibration purchases",
            "customers",
            "actual (mean)",
            "predicted (mean)",
        ],
    );
    for r in &rows {
        let k = r[0].num().unwrap_or(0.0);
        table.row(
            &[],
            &[
                if k >= 7.0 {
                    "7+".into()
                } else {
                    format!("{k:.0}")
                },
                int(r[3].num().unwrap_or(0.0)),
                format!("{:.3}", r[1].num().unwrap_or(f64::NAN)),
                format!("{:.3}", r[2].num().unwrap_or(f64::NAN)),
            ],
        );
    }
    Ok(format!(
        "<h3>Calibration vs holdout</h3><div class=\"charts\">{svg}</div>{}",
        table.html()
    ))
}
