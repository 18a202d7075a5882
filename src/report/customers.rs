//! Sections about customers: RFM segments (and moves since the previous run date), value
//! concentration, the CLV distribution with the top customers, and the P(alive) and
//! expected-purchases matrices.

use super::charts::{self, Heatmap, Lines, Mark, Series};
use super::data::{Cell, Tables, ident};
use super::html::{Fmt, Section, Table, esc, int, pct};
use crate::error::Result;

/// Customers and value per segment; moves since the previous run date of the same table.
pub async fn segments(t: &Tables, f: &Fmt) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["customer_id", "segment"]) else {
        return Ok(None);
    };
    let value = ["predicted_clv", "historical_clv", "monetary"]
        .into_iter()
        .find(|c| tab.has(c));
    let name = ident(&tab.name);
    let value_sql = value.map_or("0".to_string(), |c| format!("sum({c})"));
    let rows = t
        .query(&format!(
            "SELECT segment, count(*) AS n, {value_sql} AS v FROM {name} GROUP BY segment ORDER BY n DESC, segment"
        ))
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let total: f64 = rows.iter().filter_map(|r| r[1].num()).sum();
    let total_value: f64 = rows.iter().filter_map(|r| r[2].num()).sum();
    let labels: Vec<String> = rows.iter().map(|r| r[0].text()).collect();
    let counts: Vec<f64> = rows.iter().map(|r| r[1].num().unwrap_or(0.0)).collect();
    let values: Vec<f64> = rows.iter().map(|r| r[2].num().unwrap_or(0.0)).collect();
    let mut body = String::from("<div class=\"charts\">");
    body.push_str(&charts::hbars(
        "Customers per segment",
        &labels,
        &counts,
        "customers",
        &|v| int(v),
    )?);
    if let Some(col) = value {
        let title = format!("{} per segment", column_title(col));
        body.push_str(&charts::hbars(
            &title,
            &labels,
            &values,
            &format!("{} ({})", column_title(col), f.unit()),
            &|v| f.money_short(v),
        )?);
    }
    body.push_str("</div>");
    let value_head = value.map_or("value".to_string(), column_title);
    let mut table = Table::new(
        "segment-table",
        &[
            "segment",
            "customers",
            "share of customers",
            &value_head,
            "share of value",
        ],
    );
    for i in 0..rows.len() {
        table.row(
            &[
                ("segment", labels[i].clone()),
                ("customers", format!("{}", counts[i] as i64)),
            ],
            &[
                esc(&labels[i]),
                int(counts[i]),
                pct(counts[i] / total),
                f.money(values[i]),
                pct(values[i] / total_value),
            ],
        );
    }
    body.push_str(&table.html());
    body.push_str(&moves(t, &tab.name, tab.dated).await?);
    let best = (0..rows.len())
        .max_by(|a, b| values[*a].total_cmp(&values[*b]))
        .unwrap_or(0);
    let kpis = if value.is_some() && total_value > 0.0 {
        vec![(
            labels[best].clone(),
            format!(
                "most valuable segment: {} of customers, {} of {}",
                pct(counts[best] / total),
                pct(values[best] / total_value),
                value_head
            ),
        )]
    } else {
        Vec::new()
    };
    Ok(Some(Section {
        id: "segments",
        title: "RFM segments".into(),
        lead: format!(
            "{} customers in {} segments; the largest is {}.",
            int(total),
            rows.len(),
            labels[0]
        ),
        body,
        kpis,
    }))
}

/// Segment moves between the previous run date and this one (one aggregation, no join, so it
/// can spill at any size).
async fn moves(t: &Tables, table: &str, dated: bool) -> Result<String> {
    if !dated {
        return Ok(String::new());
    }
    let all = ident(&format!("{table}__all"));
    let prev = t
        .query(&format!(
            "SELECT max(run_date) FROM {all} WHERE run_date < '{}'",
            t.date
        ))
        .await?;
    let Some(Cell::Text(prev)) = prev.first().and_then(|r| r.first()).cloned() else {
        return Ok("<p>No earlier run date in this table: segment moves appear from the second run on.</p>".into());
    };
    let rows = t
        .query(&format!(
            "SELECT coalesce(p, '(new)') AS p, coalesce(c, '(gone)') AS c, count(*) AS n FROM (
                SELECT customer_id,
                       max(CASE WHEN run_date = '{prev}' THEN segment END) AS p,
                       max(CASE WHEN run_date = '{d}' THEN segment END) AS c
                FROM {all} WHERE run_date IN ('{prev}', '{d}') GROUP BY customer_id) AS m
             GROUP BY 1, 2 ORDER BY n DESC, 1, 2",
            d = t.date
        ))
        .await?;
    let stayed: f64 = rows
        .iter()
        .filter(|r| r[0] == r[1])
        .filter_map(|r| r[2].num())
        .sum();
    let all_n: f64 = rows.iter().filter_map(|r| r[2].num()).sum();
    let mut table = Table::new(
        "segment-moves",
        &["from (previous)", "to (now)", "customers"],
    );
    for r in rows.iter().filter(|r| r[0] != r[1]).take(15) {
        table.row(
            &[],
            &[
                esc(&r[0].text()),
                esc(&r[1].text()),
                int(r[2].num().unwrap_or(0.0)),
            ],
        );
    }
    Ok(format!(
        "<h3>Moves since {prev}</h3><p>{} of {} customers ({}) kept their segment; the largest moves:</p>{}",
        int(stayed),
        int(all_n),
        pct(stayed / all_n.max(1.0)),
        table.html()
    ))
}

fn column_title(c: &str) -> String {
    match c {
        "predicted_clv" => "predicted CLV".into(),
        "historical_clv" => "historical CLV".into(),
        "monetary" => "revenue".into(),
        other => other.replace('_', " "),
    }
}

/// Lorenz points (share of customers, share of value) with customers sorted by value, highest
/// first, from bins of ln(value) 1/20 wide: exact at the bin edges, linear inside a bin.
async fn lorenz(t: &Tables, table: &str, col: &str) -> Result<Vec<(f64, f64)>> {
    let rows = t
        .query(&format!(
            "SELECT CASE WHEN {col} > 0 THEN floor(ln({col}) * 20) END AS b, count(*) AS n,
                    sum(CASE WHEN {col} > 0 THEN {col} ELSE 0 END) AS s
             FROM {} GROUP BY 1",
            ident(table)
        ))
        .await?;
    let mut bins: Vec<(f64, f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r[0].num().unwrap_or(f64::NEG_INFINITY),
                r[1].num().unwrap_or(0.0),
                r[2].num().unwrap_or(0.0),
            )
        })
        .collect();
    bins.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n: f64 = bins.iter().map(|b| b.1).sum();
    let s: f64 = bins.iter().map(|b| b.2).sum();
    let mut points = vec![(0.0, 0.0)];
    let (mut cn, mut cs) = (0.0, 0.0);
    for (_, bn, bs) in bins {
        cn += bn;
        cs += bs;
        points.push((cn / n.max(1.0), if s > 0.0 { cs / s } else { 0.0 }));
    }
    Ok(points)
}

/// The curve's value share at customer share `x` (linear between points).
fn at(points: &[(f64, f64)], x: f64) -> f64 {
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            return if x1 > x0 {
                y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            } else {
                y1
            };
        }
    }
    points.last().map_or(0.0, |p| p.1)
}

/// The Lorenz curves of predicted and historical value, the 20 % point, and the tier table.
pub async fn concentration(t: &Tables, _f: &Fmt) -> Result<Option<Section>> {
    let Some(tab) = t
        .find(&["customer_id", "predicted_clv"])
        .or_else(|| t.find(&["customer_id", "historical_clv"]))
    else {
        return Ok(None);
    };
    let mut series = Vec::new();
    let mut marks = Vec::new();
    let mut lead = Vec::new();
    let mut kpis = Vec::new();
    for (i, col) in ["predicted_clv", "historical_clv"].into_iter().enumerate() {
        if !tab.has(col) {
            continue;
        }
        let points = lorenz(t, &tab.name, col).await?;
        let share = at(&points, 0.2);
        marks.push(Mark {
            at: (0.2, share),
            text: format!("top 20 %: {} of {}", pct(share), column_title(col)),
        });
        lead.push(format!("{} of {}", pct(share), column_title(col)));
        kpis.push((
            pct(share),
            format!(
                "of {} is held by the top 20 % of customers",
                column_title(col)
            ),
        ));
        series.push(Series {
            name: column_title(col),
            points,
            color: charts::color(i),
            dashed: false,
            dots: false,
        });
    }
    series.push(Series {
        name: "equal value per customer".into(),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
        color: charts::color(7),
        dashed: true,
        dots: false,
    });
    let svg = charts::lines(&Lines {
        title: "Value concentration (Lorenz curve)",
        x_label: "share of customers, highest value first",
        y_label: "share of value",
        x: 0.0..1.0,
        y: 0.0..1.0,
        x_fmt: &|v| format!("{:.0} %", v * 100.0),
        y_fmt: &|v| format!("{:.0} %", v * 100.0),
        series,
        marks,
        legend_lower_right: true,
    })?;
    let mut body = format!("<div class=\"charts\">{svg}</div>");
    if let Some(tiers) = t.find(&["value_tier", "customer_share", "predicted_value_share"]) {
        let hist = tiers.has("historical_value_share");
        let rows = t
            .query(&format!(
                "SELECT value_tier, customers, customer_share, predicted_value_share, {} FROM {} ORDER BY value_tier",
                if hist { "historical_value_share" } else { "NULL" },
                ident(&tiers.name)
            ))
            .await?;
        let mut table = Table::new(
            "tier-table",
            &[
                "tier",
                "customers",
                "share of customers",
                "share of predicted value",
                "share of historical value",
            ],
        );
        for r in &rows {
            let num = |i: usize| r[i].num().unwrap_or(f64::NAN);
            table.row(
                &[
                    ("tier", r[0].text()),
                    ("customer-share", r[2].text()),
                    ("value-share", r[3].text()),
                ],
                &[
                    esc(&r[0].text()),
                    int(num(1)),
                    pct(num(2)),
                    pct(num(3)),
                    pct(num(4)),
                ],
            );
        }
        body.push_str(&table.html());
    }
    Ok(Some(Section {
        id: "concentration",
        title: "Value concentration".into(),
        lead: format!("The top 20 % of customers hold {}.", lead.join(" and ")),
        body,
        kpis: kpis.into_iter().take(1).collect(),
    }))
}

/// The CLV histogram (log axis) and the top customers.
pub async fn distribution(t: &Tables, f: &Fmt) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["customer_id", "predicted_clv"]) else {
        return Ok(None);
    };
    let name = ident(&tab.name);
    let rows = t
        .query(&format!(
            "SELECT CASE WHEN predicted_clv > 0 THEN floor(log10(predicted_clv) * 10) END AS b, count(*) AS n
             FROM {name} GROUP BY 1 ORDER BY 1"
        ))
        .await?;
    let mut zero = 0.0;
    let mut bins = Vec::new();
    for r in &rows {
        match r[0].num() {
            Some(b) => bins.push((
                10f64.powf(b / 10.0),
                10f64.powf((b + 1.0) / 10.0),
                r[1].num().unwrap_or(0.0),
            )),
            None => zero += r[1].num().unwrap_or(0.0),
        }
    }
    let unit = f.unit();
    let mut body = String::from("<div class=\"charts\">");
    body.push_str(&charts::log_histogram(
        "Predicted CLV per customer",
        &format!("predicted CLV ({unit}, log scale)"),
        &bins,
        &|v| f.money_short(v),
    )?);
    body.push_str("</div>");
    if zero > 0.0 {
        body.push_str(&format!(
            "<p>{} customers with a predicted CLV of 0 or less are not on the log axis.</p>",
            int(zero)
        ));
    }
    let extra: Vec<&str> = [
        "segment",
        "historical_clv",
        "p_alive",
        "frequency",
        "acquisition_channel",
    ]
    .into_iter()
    .filter(|c| tab.has(c))
    .collect();
    let cols = std::iter::once("customer_id")
        .chain(std::iter::once("predicted_clv"))
        .chain(extra.iter().copied())
        .collect::<Vec<_>>();
    let top = t
        .query(&format!(
            "SELECT {} FROM {name} ORDER BY predicted_clv DESC, customer_id LIMIT 10",
            cols.join(", ")
        ))
        .await?;
    let heads: Vec<String> = cols.iter().map(|c| c.replace('_', " ")).collect();
    let head_refs: Vec<&str> = heads.iter().map(String::as_str).collect();
    let mut table = Table::new("top-customers", &head_refs);
    for r in &top {
        let cells: Vec<String> = cols
            .iter()
            .zip(r)
            .map(|(c, v)| match (*c, v) {
                (_, Cell::Null) => "–".into(),
                ("predicted_clv" | "historical_clv", Cell::Num(x)) => f.money(*x),
                ("p_alive", Cell::Num(x)) => pct(*x),
                ("customer_id" | "frequency", Cell::Num(x)) => format!("{}", *x as i64),
                (_, v) => esc(&v.text()),
            })
            .collect();
        table.row(&[], &cells);
    }
    body.push_str("<h3>Top 10 customers by predicted CLV</h3>");
    body.push_str(&table.html());
    let total: f64 = bins.iter().map(|b| b.2).sum::<f64>() + zero;
    Ok(Some(Section {
        id: "distribution",
        title: "CLV distribution and top customers".into(),
        lead: format!(
            "Predicted CLV of {} customers; the best are listed below.",
            int(total)
        ),
        body,
        kpis: Vec::new(),
    }))
}

/// Mean P(alive) and expected purchases by frequency × recency (lifetimes' matrices).
pub async fn matrices(t: &Tables, _f: &Fmt) -> Result<Option<Section>> {
    let Some(tab) = t.find(&["frequency", "recency_days", "p_alive", "expected_purchases"]) else {
        return Ok(None);
    };
    let name = ident(&tab.name);
    let span = t
        .query(&format!("SELECT max(recency_days) FROM {name}"))
        .await?
        .first()
        .and_then(|r| r[0].num())
        .unwrap_or(0.0);
    // Twelve columns of whole 30-day months, wide enough for the oldest customer.
    let width = ((span / 12.0 / 30.0).ceil().max(1.0) * 30.0) as i64;
    let rows = t
        .query(&format!(
            "SELECT least(frequency, 10) AS f, least(floor(recency_days / {width}), 11) AS r,
                    avg(p_alive), avg(expected_purchases), count(*)
             FROM {name} WHERE frequency >= 1 GROUP BY 1, 2"
        ))
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let freq_labels: Vec<String> = (1..=10)
        .map(|f| if f == 10 { "10+".into() } else { f.to_string() })
        .collect();
    let rec_labels: Vec<String> = (0..12)
        .map(|r| {
            if r == 11 {
                format!("{}+", r * width)
            } else {
                format!("{}–{}", r * width, (r + 1) * width)
            }
        })
        .collect();
    let mut p = vec![vec![None; 12]; 10];
    let mut e = vec![vec![None; 12]; 10];
    for r in &rows {
        let (Some(fq), Some(rc)) = (r[0].num(), r[1].num()) else {
            continue;
        };
        let (fi, ri) = ((fq as usize).clamp(1, 10) - 1, (rc as usize).min(11));
        p[fi][ri] = r[2].num();
        e[fi][ri] = r[3].num();
    }
    let emax = e
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-9);
    let text =
        |m: &Vec<Vec<Option<f64>>>, fmt: &dyn Fn(f64) -> String| -> Vec<Vec<Option<String>>> {
            m.iter()
                .map(|row| row.iter().map(|v| v.map(fmt)).collect())
                .collect()
        };
    let p_alive = charts::heatmap(&Heatmap {
        title: "Probability a customer is still active (mean P(alive))",
        x_label: "days since last order",
        y_label: "orders to date",
        cols: rec_labels.clone(),
        rows: freq_labels.clone(),
        text: text(&p, &|v| format!("{:.0}%", v * 100.0)),
        shade: p.clone(),
    })?;
    let shade_e: Vec<Vec<Option<f64>>> = e
        .iter()
        .map(|row| row.iter().map(|v| v.map(|x| x / emax)).collect())
        .collect();
    let expected = charts::heatmap(&Heatmap {
        title: "Expected purchases in the prediction horizon (mean)",
        x_label: "days since last order",
        y_label: "orders to date",
        cols: rec_labels,
        rows: freq_labels,
        text: text(&e, &|v| format!("{v:.1}")),
        shade: shade_e,
    })?;
    let at_risk = t
        .query(&format!(
            "SELECT count(*) FROM {name} WHERE p_alive < 0.5 AND frequency >= 2"
        ))
        .await?
        .first()
        .and_then(|r| r[0].num())
        .unwrap_or(0.0);
    Ok(Some(Section {
        id: "alive",
        title: "Who is about to leave".into(),
        lead: format!(
            "{} repeat customers have P(alive) below 50 %: bottom right of the first matrix.",
            int(at_risk)
        ),
        body: format!("<div class=\"charts\">{p_alive}{expected}</div>"),
        kpis: vec![(
            int(at_risk),
            "repeat customers likely to leave (P(alive) < 50 %)".into(),
        )],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_on_the_curve_is_interpolated_between_its_neighbours() {
        let pts = [(0.0, 0.0), (0.1, 0.5), (0.5, 0.9), (1.0, 1.0)];
        assert!((at(&pts, 0.2) - 0.6).abs() < 1e-12);
        assert_eq!(at(&pts, 1.0), 1.0);
    }
}
