//! The bench chart: one panel per headline metric, a horizontal bar per row (median,
//! with a line from min to max), sockgate in blue, the peers in orange, direct in grey.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::{
    coord::ranged1d::{IntoSegmentedCoord as _, SegmentValue},
    prelude::*,
    style::FontStyle,
};

use super::stats::{Stats, num};

/// The TTF the chart's text is drawn with (Debian's fonts-dejavu-core, which the bench
/// installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const PANELS: &[(&str, &str)] = &[
    ("tput_1", "Throughput, 1 stream (Gbit/s, higher is better)"),
    ("tput_4", "Throughput, 4 streams (Gbit/s, higher is better)"),
    ("rr_p50", "RR latency p50, 64 B (µs, lower is better)"),
    ("conn_rate", "New connections per second (higher is better)"),
    ("cpu_per_gb", "CPU seconds per GB moved (lower is better)"),
    (
        "slow_queued",
        "Slow receiver: MiB held in the kernel (lower is better)",
    ),
];

fn color(row: &str) -> RGBColor {
    if row.starts_with("direct") {
        RGBColor(120, 120, 120)
    } else if row.starts_with("sockgate") {
        RGBColor(31, 119, 180)
    } else {
        RGBColor(230, 126, 34)
    }
}

/// A row's name as the chart shows it: the node-local rows' suffix shortened, so that
/// the names fit beside the bars.
fn label(row: &str) -> String {
    row.replace(" (node-local client)", ", node-local")
        .replace("+ local shortcut", "+ shortcut")
}

fn register_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| format!("reading the font {FONT}"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

/// Draws the chart to `path` (PNG).
pub fn draw(path: &Path, stats: &Stats, rows: &[String]) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1800, 1200)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (title, body) = root.split_vertically(50);
    title
        .titled(
            "sockgate vs direct and userspace proxies (medians; line = min to max)",
            ("sans-serif", 26),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let panels = body.split_evenly((3, 2));
    let n = rows.len();
    let labels: Vec<String> = rows.iter().map(|r| label(r)).collect();
    // About 7.5 pixels per character at the labels' size.
    let label_area = labels
        .iter()
        .map(|l| l.chars().count() * 15 / 2 + 12)
        .max()
        .unwrap_or(0)
        .max(190);
    for (area, (metric, caption)) in panels.iter().zip(PANELS) {
        let values: Vec<Option<(f64, f64, f64)>> = rows
            .iter()
            .map(|r| {
                stats
                    .get(&(r.clone(), *metric))
                    .map(|s| (s.median, s.min, s.max))
            })
            .collect();
        let xmax = values
            .iter()
            .flatten()
            .map(|v| v.2)
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.22;
        let mut chart = ChartBuilder::on(area)
            .caption(*caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(u32::try_from(label_area).unwrap_or(190))
            .build_cartesian_2d(0.0..xmax, (0..n.saturating_sub(1)).into_segmented())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => n
                    .checked_sub(1 + *i)
                    .and_then(|k| labels.get(k))
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|v| num(*v))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        // Rows top to bottom in run order: row k sits at segment n-1-k.
        for (k, (row, v)) in rows.iter().zip(&values).enumerate() {
            let Some((median, min, max)) = *v else {
                continue;
            };
            let y = n - 1 - k;
            let c = color(row);
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (median, SegmentValue::Exact(y + 1)),
                ],
                c.filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            chart
                .draw_series(std::iter::once(bar))
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![
                        (min, SegmentValue::CenterOf(y)),
                        (max, SegmentValue::CenterOf(y)),
                    ],
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {}", num(median)),
                    (max, SegmentValue::CenterOf(y)),
                    ("sans-serif", 15).into_font().color(&BLACK),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
