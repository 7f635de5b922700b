//! The soak's files: the figures of every sample as CSV (`seconds,path,metric,value`)
//! and an SVG plot of them, one panel per metric and one line per data path, drawn
//! here without a plotting library.
#![expect(
    clippy::cast_precision_loss,
    reason = "seconds and panel indexes become SVG coordinates"
)]
use std::{collections::BTreeMap, fmt::Write as _};

/// One figure of one sample.
#[derive(Clone, Debug)]
pub struct Row {
    /// Seconds since the load started (negative: before it).
    pub secs: i64,
    /// The data path (agent), or `machine` for machine-wide figures.
    pub path: String,
    pub metric: String,
    pub value: f64,
}

/// The rows as CSV.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from("seconds,path,metric,value\n");
    for r in rows {
        let _ = writeln!(out, "{},{},{},{}", r.secs, r.path, r.metric, r.value);
    }
    out
}

/// The panels of the plot: (metric, title).
pub const PANELS: [(&str, &str); 8] = [
    ("rss_mib", "agent resident memory (MiB)"),
    ("fds", "agent open descriptors"),
    ("map_hash_entries", "pinned hash map entries (connections)"),
    ("tcp_inuse", "TCP sockets in use, node namespace"),
    ("tcp_mem_mib", "kernel TCP memory (MiB, machine)"),
    ("slab_mib", "slab (MiB, machine)"),
    ("intact_mib", "bytes received intact (MiB, cumulative)"),
    (
        "unexpected_failures",
        "unexpected failed connections (cumulative)",
    ),
];

const COLOURS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#444444"];

/// An SVG of the rows: a grid of [`PANELS`], x in minutes.
#[expect(clippy::many_single_char_names, reason = "coordinates: x, y, w, h")]
pub fn svg(rows: &[Row], title: &str) -> String {
    let (pw, ph, cols) = (420.0_f64, 220.0_f64, 2usize);
    let paths: Vec<String> = {
        let mut p: Vec<String> = rows.iter().map(|r| r.path.clone()).collect();
        p.sort();
        p.dedup();
        p
    };
    let rows_n = PANELS.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64 + 20.0, ph * rows_n as f64 + 70.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for (i, p) in paths.iter().enumerate() {
        let x = 10.0 + 110.0 * i as f64;
        let c = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"32\" width=\"12\" height=\"4\" fill=\"{c}\"/><text x=\"{}\" y=\"38\">{}</text>",
            x + 16.0,
            escape(p)
        );
    }
    let (t_min, t_max) = rows.iter().fold((0_i64, 1_i64), |(lo, hi), r| {
        (lo.min(r.secs), hi.max(r.secs))
    });
    for (k, (metric, ptitle)) in PANELS.iter().enumerate() {
        let ox = 10.0 + pw * (k % cols) as f64;
        let oy = 50.0 + ph * (k / cols) as f64;
        let (ix, iy, iw, ih) = (ox + 50.0, oy + 20.0, pw - 70.0, ph - 50.0);
        let mut series: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.metric == *metric) {
            series.entry(&r.path).or_default().push((r.secs, r.value));
        }
        let vmax = series
            .values()
            .flatten()
            .map(|(_, v)| *v)
            .fold(0.0_f64, f64::max);
        let vmax = if vmax <= 0.0 { 1.0 } else { vmax * 1.1 };
        let _ = writeln!(
            s,
            "<text x=\"{ox}\" y=\"{}\" font-size=\"12\">{}</text>\n\
             <rect x=\"{ix}\" y=\"{iy}\" width=\"{iw}\" height=\"{ih}\" fill=\"none\" stroke=\"#999\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\n\
             <text x=\"{ix}\" y=\"{}\">{:.1} min</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.1} min</text>",
            oy + 12.0,
            escape(ptitle),
            ix - 4.0,
            iy + 10.0,
            short_number(vmax),
            ix - 4.0,
            iy + ih,
            iy + ih + 14.0,
            t_min as f64 / 60.0,
            ix + iw,
            iy + ih + 14.0,
            t_max as f64 / 60.0,
        );
        for (path, pts) in &series {
            let c = paths
                .iter()
                .position(|p| p == path)
                .map_or("#000", |i| COLOURS[i % COLOURS.len()]);
            let span = (t_max - t_min).max(1) as f64;
            let points: Vec<String> = pts
                .iter()
                .map(|(t, v)| {
                    format!(
                        "{:.1},{:.1}",
                        ix + iw * (t - t_min) as f64 / span,
                        iy + ih - ih * v / vmax
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
                points.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_svg_carry_every_series() {
        let rows: Vec<Row> = (0..3)
            .flat_map(|m| {
                ["splice", "forward"].map(|p| Row {
                    secs: m * 60,
                    path: p.into(),
                    metric: "rss_mib".into(),
                    value: 10.0 + m as f64,
                })
            })
            .collect();
        let c = csv(&rows);
        assert_eq!(c.lines().count(), 7);
        assert!(c.contains("120,forward,rss_mib,12"), "{c}");
        let svg = svg(&rows, "t <1>");
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
