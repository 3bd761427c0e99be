//! The robustness plot: one panel per statistic, temperature on x, one line per model.

use std::path::Path;

use plotters::prelude::*;

use super::robustness::{RobustnessTable, TemperatureStats};
use crate::plot::{draw_err, ensure_font, COLORS, FONT};
use crate::{Error, Result};

type Statistic = (&'static str, fn(&TemperatureStats) -> Option<f64>);

const PANELS: [Statistic; 6] = [
    ("mean length (tokens)", |s| Some(s.mean_length)),
    ("distinct-1", |s| s.distinct_1),
    ("distinct-2", |s| s.distinct_2),
    ("repeated 4-grams", |s| s.repetition_4),
    ("ends with EOS", |s| Some(s.eos_fraction)),
    ("reference mean log-prob", |s| s.reference_mean_logp),
];

/// Draws the robustness statistics of every table (one colour per model) into a PNG at
/// `path`: six panels (length, distinct-1, distinct-2, repetition, EOS, reference log-prob).
pub fn plot_robustness(path: impl AsRef<Path>, tables: &[RobustnessTable]) -> Result<()> {
    let path = path.as_ref();
    let temps: Vec<f64> = tables
        .iter()
        .flat_map(|t| t.rows.iter().map(|r| r.temperature))
        .collect();
    if temps.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no robustness rows to plot",
            path.display()
        )));
    }
    let t_lo = temps.iter().copied().fold(f64::INFINITY, f64::min);
    let t_hi = temps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (t_lo, t_hi) = padded(t_lo, t_hi);

    ensure_font();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let panels = root.split_evenly((2, 3));

    for (area, (title, stat)) in panels.iter().zip(PANELS) {
        let values: Vec<f64> = tables
            .iter()
            .flat_map(|t| t.rows.iter().filter_map(stat))
            .filter(|v| v.is_finite())
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (y_lo, y_hi) = if values.is_empty() {
            (0.0, 1.0)
        } else {
            padded(lo, hi)
        };

        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT, 18))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d(t_lo..t_hi, y_lo..y_hi)
            .map_err(|e| draw_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("temperature")
            .label_style((FONT, 12))
            .draw()
            .map_err(|e| draw_err(path, e))?;

        for (m, table) in tables.iter().enumerate() {
            let color = COLORS[m % COLORS.len()];
            let points: Vec<(f64, f64)> = table
                .rows
                .iter()
                .filter_map(|r| {
                    stat(r)
                        .filter(|v| v.is_finite())
                        .map(|v| (r.temperature, v))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| draw_err(path, e))?
                .label(table.model.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| draw_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 12))
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }

    root.present().map_err(|e| draw_err(path, e))
}

/// A range around `[lo, hi]` with 5% room on each side (or ±0.5 around a single value).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let room = 0.05 * (hi - lo);
    (lo - room, hi + room)
}
