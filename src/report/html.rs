//! Numbers for people and the page around the sections: thousands separators, money in the
//! exports' currency, percentages, escaped text, and one inline style sheet (nothing is loaded
//! from anywhere: the page opens offline, from object storage, or as an attachment).

use std::fmt::Write;

/// How numbers are shown.
#[derive(Debug, Clone)]
pub struct Fmt {
    /// Currency symbol shown before amounts (`$`), or a code shown after them (`CHF`).
    prefix: String,
    suffix: String,
}

impl Fmt {
    pub fn new(currency: &str) -> Self {
        let symbol = match currency.to_ascii_uppercase().as_str() {
            "USD" => Some("$"),
            "EUR" => Some("€"),
            "GBP" => Some("£"),
            "JPY" | "CNY" => Some("¥"),
            "INR" => Some("₹"),
            _ => None,
        };
        match symbol {
            Some(s) => Self {
                prefix: s.to_string(),
                suffix: String::new(),
            },
            None if currency.chars().count() == 1 => Self {
                prefix: currency.to_string(),
                suffix: String::new(),
            },
            None => Self {
                prefix: String::new(),
                suffix: format!(" {currency}"),
            },
        }
    }

    /// `1234567.891` → `$1,234,567.89`.
    pub fn money(&self, v: f64) -> String {
        if !v.is_finite() {
            return "–".into();
        }
        let sign = if v < 0.0 { "-" } else { "" };
        format!(
            "{sign}{}{}{}",
            self.prefix,
            decimal(v.abs(), 2),
            self.suffix
        )
    }

    /// Whole currency units, for axes: `$1.2M`, `$35k`, `$120`.
    pub fn money_short(&self, v: f64) -> String {
        format!("{}{}{}", self.prefix, short(v), self.suffix)
    }

    /// The unit an axis is in: `$` or `CHF`.
    pub fn unit(&self) -> String {
        if self.prefix.is_empty() {
            self.suffix.trim().to_string()
        } else {
            self.prefix.clone()
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn int(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let sign = if v < 0.0 { "-" } else { "" };
    format!("{sign}{}", group(format!("{:.0}", v.abs().round())))
}

/// `v` with `places` decimals and thousands separators.
pub fn decimal(v: f64, places: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.*}", places, v.abs());
    let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
    let sign = if v < 0.0 && s.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{}", group(whole.to_string()))
    } else {
        format!("{sign}{}.{frac}", group(whole.to_string()))
    }
}

fn group(digits: String) -> String {
    let n = digits.len();
    let mut out = String::with_capacity(n + n / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (n - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `0.1234` → `12.3 %`.
pub fn pct(share: f64) -> String {
    if !share.is_finite() {
        return "–".into();
    }
    format!("{:.1} %", share * 100.0)
}

/// Short numbers for axes: `1.2M`, `35k`, `120`, `0.5`.
pub fn short(v: f64) -> String {
    let a = v.abs();
    let sign = if v < 0.0 { "-" } else { "" };
    if a >= 1e9 {
        format!("{sign}{}B", trim(a / 1e9))
    } else if a >= 1e6 {
        format!("{sign}{}M", trim(a / 1e6))
    } else if a >= 1e4 {
        format!("{sign}{}k", trim(a / 1e3))
    } else if a >= 100.0 || a == 0.0 {
        format!("{sign}{a:.0}")
    } else if a >= 1.0 {
        format!("{sign}{}", trim(a))
    } else {
        format!("{sign}{}", (format!("{a:.2}")).trim_end_matches('0'))
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Text for HTML (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A table: header cells, then rows of (attributes of the row, cells). Cells are HTML already
/// (escape text with [`esc`]); numbers are right-aligned by the style sheet (`class="n"`).
pub struct Table {
    head: Vec<String>,
    rows: Vec<String>,
    id: String,
}

impl Table {
    pub fn new(id: &str, head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|h| esc(h)).collect(),
            rows: Vec::new(),
            id: id.to_string(),
        }
    }

    /// A row; `attrs` become `data-<key>="value"` attributes, for tests and scripts reading the
    /// page; cells starting with a digit, sign or currency are right-aligned.
    pub fn row(&mut self, attrs: &[(&str, String)], cells: &[String]) {
        let mut tr = String::from("<tr");
        for (k, v) in attrs {
            let _ = write!(tr, " data-{k}=\"{}\"", esc(v));
        }
        tr.push('>');
        for c in cells {
            let numeric = c
                .chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_digit() || "-–+$€£¥₹".contains(ch));
            if numeric {
                let _ = write!(tr, "<td class=\"n\">{c}</td>");
            } else {
                let _ = write!(tr, "<td>{c}</td>");
            }
        }
        tr.push_str("</tr>");
        self.rows.push(tr);
    }

    pub fn html(&self) -> String {
        let mut s = format!("<table class=\"data\" id=\"{}\"><thead><tr>", esc(&self.id));
        for h in &self.head {
            let _ = write!(s, "<th>{h}</th>");
        }
        s.push_str("</tr></thead><tbody>");
        for r in &self.rows {
            s.push_str(r);
        }
        s.push_str("</tbody></table>");
        s
    }
}

/// One section of the page.
pub struct Section {
    pub id: &'static str,
    pub title: String,
    /// One sentence that says what to read off it.
    pub lead: String,
    pub body: String,
    /// Headline figures for the page's "at a glance" row: (value, what it is).
    pub kpis: Vec<(String, String)>,
}

const STYLE: &str = "
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d2733;background:#f4f6f8}
header{background:#1d3557;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}
nav{padding:8px 32px;background:#e6ebf0;font-size:13px}
nav a{margin-right:14px;color:#1d3557}
main{padding:8px 32px 40px;max-width:1180px}
section{background:#fff;border-radius:6px;padding:16px 22px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section h2{margin:0 0 4px;font-size:18px;color:#1d3557}
p.lead{margin:0 0 12px;color:#44515f}
.warn{background:#fff4e5;border-left:4px solid #f59f00;padding:6px 12px;margin:6px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.charts svg{max-width:100%;height:auto}
table.data{border-collapse:collapse;font-size:13px;margin:8px 0}
table.data th{text-align:left;border-bottom:2px solid #c9d2dc;padding:4px 10px}
table.data td{border-bottom:1px solid #e6ebf0;padding:3px 10px}
table.data td.n{text-align:right;font-variant-numeric:tabular-nums}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
.kpi{background:#f4f6f8;border-radius:6px;padding:8px 14px;min-width:150px}
.kpi b{display:block;font-size:20px;color:#1d3557}
.kpi span{font-size:12px;color:#44515f}
";

/// The whole page.
pub fn page(title: &str, subtitle: &str, sections: &[Section]) -> String {
    let mut s = String::from("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(
        s,
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body>",
        esc(title)
    );
    let _ = write!(
        s,
        "<header><h1>{}</h1><p>{}</p></header><nav>",
        esc(title),
        esc(subtitle)
    );
    for sec in sections {
        let _ = write!(s, "<a href=\"#{}\">{}</a>", sec.id, esc(&sec.title));
    }
    s.push_str("</nav><main>");
    for sec in sections {
        let _ = writeln!(
            s,
            "<section id=\"{}\"><h2>{}</h2><p class=\"lead\">{}</p>{}</section>",
            sec.id,
            esc(&sec.title),
            esc(&sec.lead),
            sec.body
        );
    }
    s.push_str("</main></body></html>\n");
    s
}

/// A row of headline figures.
pub fn kpis<S: AsRef<str>>(items: &[(String, S)]) -> String {
    let mut s = String::from("<div class=\"kpis\">");
    for (value, label) in items {
        let _ = write!(
            s,
            "<div class=\"kpi\"><b>{}</b><span>{}</span></div>",
            esc(value),
            esc(label.as_ref())
        );
    }
    s.push_str("</div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_for_people() {
        assert_eq!(int(1234567.0), "1,234,567");
        assert_eq!(int(-999.0), "-999");
        assert_eq!(decimal(1234.5, 2), "1,234.50");
        assert_eq!(decimal(-0.001, 2), "0.00");
        assert_eq!(Fmt::new("USD").money(1234567.891), "$1,234,567.89");
        assert_eq!(Fmt::new("EUR").money(-5.0), "-€5.00");
        assert_eq!(Fmt::new("CHF").money(12.0), "12.00 CHF");
        assert_eq!(pct(0.6123), "61.2 %");
        assert_eq!(short(1_240_000.0), "1.2M");
        assert_eq!(short(35_000.0), "35k");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
