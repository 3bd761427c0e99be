//! Metric curves: each series drawn raw (faint) and EMA-smoothed (solid) against its step.

use std::path::Path;

use plotters::prelude::*;

use super::{draw_err, ensure_font, ensure_parent, finite_range, COLORS, FONT};
use crate::{Error, Result};

/// How a curve plot looks.
#[derive(Debug, Clone)]
pub struct CurveOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// EMA smoothing weight in `[0, 1)`: 0 draws the raw series only, 0.9 smooths strongly
    /// (TensorBoard's convention).
    pub smoothing: f64,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
}

impl Default for CurveOptions {
    fn default() -> Self {
        Self {
            width: 800,
            height: 500,
            smoothing: 0.6,
            x_label: "step".to_string(),
            y_label: String::new(),
        }
    }
}

/// Exponential moving average with TensorBoard's bias correction: the first output equals the
/// first input, and `weight` = 0 returns the series unchanged. Non-finite inputs are carried
/// through as they are and do not disturb the average.
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let mut average = 0.0;
    let mut seen = 0i32;
    let mut out = Vec::with_capacity(values.len());
    for &v in values {
        if !v.is_finite() {
            out.push(v);
            continue;
        }

        average = weight * average + (1.0 - weight) * v;
        seen += 1;
        let debias = 1.0 - weight.powi(seen);
        out.push(if debias > 0.0 { average / debias } else { v });
    }
    out
}

/// Draws each named series (value `i` at step `i`) into a PNG at `path`: the raw values faint,
/// their EMA in full colour, with a legend. Non-finite values are skipped.
pub fn curves(
    path: impl AsRef<Path>,
    title: &str,
    series: &[(String, Vec<f64>)],
    opts: &CurveOptions,
) -> Result<()> {
    let path = path.as_ref();
    if !(0.0..1.0).contains(&opts.smoothing) {
        return Err(Error::invalid(format!(
            "curve smoothing must be in [0, 1), got {}",
            opts.smoothing
        )));
    }
    let longest = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let Some((y_lo, y_hi)) = finite_range(series.iter().flat_map(|(_, v)| v.iter().copied()))
    else {
        return Err(Error::invalid(format!(
            "{}: no finite value to plot in {} series",
            path.display(),
            series.len()
        )));
    };

    ensure_font();
    ensure_parent(path)?;
    let root = BitMapBackend::new(path, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let x_hi = (longest.max(2) - 1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_hi, y_lo..y_hi)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(opts.x_label.as_str())
        .y_desc(opts.y_label.as_str())
        // The x axis counts steps: whole numbers only (no "0.5" ticks on short runs).
        // (no more labels than steps, so the "nice" tick spacing is never below one)
        .x_labels((x_hi as usize + 1).clamp(2, 11))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    for (i, (name, values)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = |vals: &[f64]| -> Vec<(f64, f64)> {
            vals.iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(x, &v)| (x as f64, v))
                .collect()
        };
        if opts.smoothing > 0.0 {
            chart
                .draw_series(LineSeries::new(points(values), color.mix(0.25)))
                .map_err(|e| draw_err(path, e))?;
        }
        chart
            .draw_series(LineSeries::new(
                points(&ema(values, opts.smoothing)),
                color.stroke_width(2),
            ))
            .map_err(|e| draw_err(path, e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }

    if !series.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}
