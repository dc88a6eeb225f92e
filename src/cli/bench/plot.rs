//! Line charts as standalone SVG text, for the plots of `BENCHMARKS.md`: axes from zero with
//! round ticks, one polyline with point marks per series, a legend. No plotting library: a
//! chart of a few series of a few points each is a page of markup.

use std::fmt::Write as _;

/// Width and height of a chart, in SVG user units (pixels when shown as is).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
/// The plot area's margins: left for the y tick labels and axis title, bottom for x's.
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 56.0;
/// Series colours, in order: distinguishable for the common colour blindnesses.
const COLOURS: [&str; 4] = ["#0072b2", "#d55e00", "#009e73", "#cc79a7"];

/// One line of a chart.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    /// Its legend entry.
    pub(crate) name: String,
    /// Its points (x, y), drawn in this order.
    pub(crate) points: Vec<(f64, f64)>,
    /// Drawn dashed (a floor, a reference).
    pub(crate) dashed: bool,
}

/// A chart: a title, the axes' titles and the series.
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) series: Vec<Series>,
}

/// Round tick values from 0 to at least `max`: steps of 1, 2 or 5 × 10ⁿ, about five of them.
fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / 5.0;
    let magnitude = 10_f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * magnitude);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// A tick label: no trailing zeros, thousands as "k".
fn label(value: f64) -> String {
    if value >= 1_000.0 && (value / 1_000.0).fract() == 0.0 {
        format!("{}k", value / 1_000.0)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Text with the five characters XML reserves escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub(crate) fn svg(&self) -> String {
        let points = || self.series.iter().flat_map(|series| &series.points);
        let x_ticks = ticks(points().map(|point| point.0).fold(0.0, f64::max));
        let y_ticks = ticks(points().map(|point| point.1).fold(0.0, f64::max));
        let x_max = x_ticks.last().copied().unwrap_or(1.0);
        let y_max = y_ticks.last().copied().unwrap_or(1.0);
        let (width, height) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let x_of = |x: f64| LEFT + x / x_max * width;
        let y_of = |y: f64| TOP + height - y / y_max * height;

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            out,
            r##"<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        for &x in &x_ticks {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
                x_of(x),
                TOP + height,
                TOP + height + 18.0,
                label(x)
            );
        }
        for &y in &y_ticks {
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#e5e5e5"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
                y_of(y),
                LEFT + width,
                LEFT - 6.0,
                y_of(y) + 4.0,
                label(y)
            );
        }
        let _ = writeln!(
            out,
            r##"<path d="M{LEFT} {TOP}V{0:.1}H{1:.1}" fill="none" stroke="#333333"/>"##,
            TOP + height,
            LEFT + width
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + width / 2.0,
            HEIGHT - 14.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + height / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let path: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for &(x, y) in &series.points {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    x_of(x),
                    y_of(y)
                );
            }
            // The legend, top left inside the plot area.
            let legend_y = TOP + 14.0 + 18.0 * i as f64;
            let _ = writeln!(
                out,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{3:.1}" y="{4:.1}">{5}</text>"#,
                LEFT + 12.0,
                legend_y,
                LEFT + 36.0,
                LEFT + 42.0,
                legend_y + 4.0,
                escape(&series.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_largest_value() {
        assert_eq!(ticks(87.0), [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(4.2), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ticks(150_000.0), [0.0, 50_000.0, 100_000.0, 150_000.0]);
        // Nothing to show still gives an axis, 0 to 1.
        let empty = ticks(0.0);
        assert_eq!((empty.len(), empty.last().copied()), (6, Some(1.0)));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(label(50_000.0), "50k");
        assert_eq!(label(20.0), "20");
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(1_500.0), "1500");
    }

    fn chart() -> Chart {
        Chart {
            title: "p99 <latency> & load".into(),
            x_label: "deliveries/s".into(),
            y_label: "ms".into(),
            series: vec![
                Series {
                    name: "fjord".into(),
                    points: vec![(0.0, 0.0), (100.0, 50.0)],
                    dashed: false,
                },
                Series {
                    name: "floor".into(),
                    points: vec![(50.0, 10.0)],
                    dashed: true,
                },
            ],
        }
    }

    #[test]
    fn points_land_on_the_axes_scale() {
        let svg = chart().svg();
        // x from 0 to 100 spans LEFT..WIDTH-RIGHT; y from 0 to 50 spans the plot's height.
        assert!(
            svg.contains(r#"<polyline points="72.0,344.0 616.0,48.0""#),
            "{svg}"
        );
        assert!(svg.contains(r#"points="344.0,284.8""#), "{svg}");
        assert!(svg.contains(r#"stroke-dasharray="6 4""#), "{svg}");
        assert!(svg.contains(">fjord</text>") && svg.contains(">floor</text>"));
    }

    #[test]
    fn the_document_is_well_formed_with_its_text_escaped() {
        let svg = chart().svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(svg.contains("p99 &lt;latency&gt; &amp; load"), "{svg}");
        // Every element is closed: each `<name` is matched by `/>` or `</name>`.
        for name in ["svg", "text"] {
            assert_eq!(
                svg.matches(&format!("<{name} ")).count(),
                svg.matches(&format!("</{name}>")).count(),
                "{name}"
            );
        }
        for name in ["rect", "line", "path", "polyline", "circle"] {
            let opened = svg.matches(&format!("<{name} ")).count();
            let closed = svg
                .split(&format!("<{name} "))
                .skip(1)
                .filter(|rest| rest.split('>').next().is_some_and(|tag| tag.ends_with('/')))
                .count();
            assert_eq!(opened, closed, "{name}");
        }
    }
}
