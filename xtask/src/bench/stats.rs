//! Summary statistics of the samples (min, median, max per row and metric) and the
//! number format the report and the chart share.
use std::collections::BTreeMap;

use super::Sample;

/// Min, median, max and count of one row's samples of one metric.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

/// Summary statistics keyed by (row, metric).
pub type Stats = BTreeMap<(String, &'static str), Stat>;

pub fn stats(samples: &[Sample]) -> Stats {
    let mut by: BTreeMap<(String, &'static str), Vec<f64>> = BTreeMap::new();
    for s in samples {
        by.entry((s.row.clone(), s.metric))
            .or_default()
            .push(s.value);
    }
    by.into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let median = if n % 2 == 1 {
                v[n / 2]
            } else {
                f64::midpoint(v[n / 2 - 1], v[n / 2])
            };
            (
                k,
                Stat {
                    min: v[0],
                    median,
                    max: v[n - 1],
                    n,
                },
            )
        })
        .collect()
}

/// A number with a precision suited to its size.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{v:.0}");
        // Thousands separators for readability.
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
