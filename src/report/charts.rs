//! The report's charts, drawn with plotters' SVG backend into strings that go inline into the
//! page. Text stays SVG `<text>` (no font is loaded; the browser uses its sans-serif).

use std::ops::Range;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::error::{Error, Result};

const WIDTH: u32 = 760;
const FONT: &str = "sans-serif";

fn err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Internal(format!("draw a report chart: {e:?}"))
}

/// The colours of series and bars, in order (colour-blind safe "tableau" set).
pub fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

const RED: RGBColor = RGBColor(214, 39, 40);
const GREEN: RGBColor = RGBColor(44, 160, 44);

/// plotters writes a standalone SVG document; inline in HTML the namespace is implied, and
/// leaving it out keeps the page free of any `http://` text.
fn finish(svg: String) -> String {
    svg.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
}

/// Room for the longest label, in pixels (about 7 px per character at 12 px).
fn label_width(labels: &[String]) -> u32 {
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4) as u32;
    (longest * 7 + 16).clamp(40, 260)
}

/// The frame of the x–y charts: title, margin, room for the axis labels.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, (FONT, 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    b
}

/// The legend of the series drawn with a label.
fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 12))
        .draw()
        .map_err(err)
}

/// The last key of a segmented axis of `n` segments (plotters makes one segment per key of
/// an inclusive range).
fn last(n: i32) -> i32 {
    (n - 1).max(1)
}

/// Horizontal bars, one per label (first label on top), each with its value written at its end.
pub fn hbars(
    title: &str,
    labels: &[String],
    values: &[f64],
    x_label: &str,
    fmt: &dyn Fn(f64) -> String,
) -> Result<String> {
    let n = labels.len() as i32;
    let max = values.iter().copied().fold(0.0, f64::max);
    let max = if max > 0.0 { max * 1.18 } else { 1.0 };
    let height = 80 + 26 * n.max(4) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(label_width(labels))
            .build_cartesian_2d(0f64..max, (0..last(n)).into_segmented())
            .map_err(err)?;
        let row = |i: usize| n - 1 - i as i32;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE.mix(0.0))
            .y_labels(n.max(1) as usize)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(r) => labels
                    .get((n - 1 - r) as usize)
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|v| fmt(*v))
            .x_desc(x_label)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let mut r = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(row(i))),
                        (v.max(0.0), SegmentValue::Exact(row(i) + 1)),
                    ],
                    color(0).filled(),
                );
                r.set_margin(3, 3, 0, 0);
                r
            }))
            .map_err(err)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                Text::new(
                    format!(" {}", fmt(*v)),
                    (v.max(0.0), SegmentValue::CenterOf(row(i))),
                    (FONT, 12).into_font(),
                )
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(finish(svg))
}

/// One line of a [`lines`] chart.
pub struct Series {
    /// Its legend entry (none when empty).
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
    /// A dot at every point.
    pub dots: bool,
}

/// A labelled point on a [`lines`] chart.
pub struct Mark {
    pub at: (f64, f64),
    pub text: String,
}

/// A line chart.
pub struct Lines<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x: Range<f64>,
    pub y: Range<f64>,
    pub x_fmt: &'a dyn Fn(f64) -> String,
    pub y_fmt: &'a dyn Fn(f64) -> String,
    pub series: Vec<Series>,
    pub marks: Vec<Mark>,
    /// Legend in the lower right instead of the upper left.
    pub legend_lower_right: bool,
}

pub fn lines(spec: &Lines<'_>) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = frame(&root, spec.title)
            .build_cartesian_2d(spec.x.clone(), spec.y.clone())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(spec.x_label)
            .y_desc(spec.y_label)
            .x_label_formatter(&|v| (spec.x_fmt)(*v))
            .y_label_formatter(&|v| (spec.y_fmt)(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for s in &spec.series {
            let c = s.color;
            let style = c.stroke_width(2);
            let drawn = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(s.points.clone(), 6, 4, style))
                    .map_err(err)?
            } else {
                chart
                    .draw_series(LineSeries::new(s.points.clone(), style))
                    .map_err(err)?
            };
            if !s.name.is_empty() {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            }
            if s.dots {
                chart
                    .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(err)?;
            }
        }
        for m in &spec.marks {
            chart
                .draw_series(std::iter::once(Circle::new(m.at, 5, BLACK.filled())))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("  {}", m.text),
                    m.at,
                    (FONT, 13).into_font(),
                )))
                .map_err(err)?;
        }
        legend(
            &mut chart,
            if spec.legend_lower_right {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperLeft
            },
        )?;
        root.present().map_err(err)?;
    }
    Ok(finish(svg))
}

/// A histogram on a logarithmic x axis: bins as (low edge, high edge, count), all edges > 0.
pub fn log_histogram(
    title: &str,
    x_label: &str,
    bins: &[(f64, f64, f64)],
    x_fmt: &dyn Fn(f64) -> String,
) -> Result<String> {
    let lo = bins.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
    let hi = bins.iter().map(|b| b.1).fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (1.0, 10.0)
    };
    let top = bins.iter().map(|b| b.2).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = frame(&root, title)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("customers")
            .x_label_formatter(&|v| x_fmt(*v))
            .y_label_formatter(&|v| super::html::short(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bins.iter().map(|(a, b, n)| {
                Rectangle::new([(*a, 0.0), (*b, *n)], color(0).mix(0.85).filled())
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(finish(svg))
}

/// A heat map: `cells[row][col]` shown as text, shaded by `shade[row][col]` in 0..=1 (None:
/// an empty cell). The first row is drawn on top.
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub cols: Vec<String>,
    pub rows: Vec<String>,
    pub text: Vec<Vec<Option<String>>>,
    pub shade: Vec<Vec<Option<f64>>>,
}

/// White to dark blue.
fn blue(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(247.0, 8.0), mix(251.0, 48.0), mix(255.0, 107.0))
}

pub fn heatmap(spec: &Heatmap<'_>) -> Result<String> {
    let (nr, nc) = (spec.rows.len() as i32, spec.cols.len() as i32);
    let height = (90 + 28 * nr.max(4) as u32).min(1400);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(spec.title, (FONT, 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(label_width(&spec.rows).max(70))
            .build_cartesian_2d(
                (0..last(nc)).into_segmented(),
                (0..last(nr)).into_segmented(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nc.max(1) as usize)
            .y_labels(nr.max(1) as usize)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(c) => {
                    spec.cols.get(*c as usize).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(r) => spec
                    .rows
                    .get((nr - 1 - r) as usize)
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .x_desc(spec.x_label)
            .y_desc(spec.y_label)
            .draw()
            .map_err(err)?;
        let mut cells = Vec::new();
        let mut labels = Vec::new();
        for (r, row) in spec.shade.iter().enumerate() {
            let y = nr - 1 - r as i32;
            for (c, v) in row.iter().enumerate() {
                let Some(v) = v else { continue };
                let c = c as i32;
                cells.push(Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1)),
                    ],
                    blue(*v).filled(),
                ));
                if let Some(Some(t)) = spec.text.get(r).and_then(|row| row.get(c as usize)) {
                    let ink = if *v > 0.55 { WHITE } else { BLACK };
                    labels.push(Text::new(
                        t.clone(),
                        (SegmentValue::CenterOf(c), SegmentValue::CenterOf(y)),
                        (FONT, 10).into_font().color(&ink).pos(
                            plotters::style::text_anchor::Pos::new(
                                plotters::style::text_anchor::HPos::Center,
                                plotters::style::text_anchor::VPos::Center,
                            ),
                        ),
                    ));
                }
            }
        }
        chart.draw_series(cells).map_err(err)?;
        chart.draw_series(labels).map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(finish(svg))
}

/// LTV against CAC per channel with the break-even line LTV = CAC; channels below it in red.
pub fn break_even(
    title: &str,
    points: &[(String, f64, f64)],
    fmt: &dyn Fn(f64) -> String,
    unit: &str,
) -> Result<String> {
    let max = points
        .iter()
        .flat_map(|(_, x, y)| [*x, *y])
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.2;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = frame(&root, title)
            .build_cartesian_2d(0f64..max, 0f64..max)
            .map_err(err)?;
        let x_desc = format!("average acquisition cost per customer ({unit})");
        let y_desc = format!("average lifetime value per customer ({unit})");
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| fmt(*v))
            .y_label_formatter(&|v| fmt(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (max, max)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(err)?
            .label("break-even: LTV = CAC")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
        for (name, cac, ltv) in points {
            let c = if ltv < cac { RED } else { GREEN };
            chart
                .draw_series(std::iter::once(Circle::new((*cac, *ltv), 6, c.filled())))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("  {name}"),
                    (*cac, *ltv),
                    (FONT, 13).into_font(),
                )))
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(err)?;
    }
    Ok(finish(svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_inline_svg_without_outside_references() {
        let svg = hbars(
            "t <1>",
            &["a".into(), "b".into()],
            &[1.0, 2.0],
            "customers",
            &|v| format!("{v:.0}"),
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(!svg.contains("http"), "{svg}");
        assert!(svg.contains("t &lt;1&gt;"), "title not escaped: {svg}");
        let h = log_histogram("h", "x", &[(1.0, 10.0, 5.0), (10.0, 100.0, 2.0)], &|v| {
            format!("{v}")
        })
        .unwrap();
        assert!(h.contains("<rect"), "{h}");
    }
}
