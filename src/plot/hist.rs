//! Histograms of one sample, e.g. the reward margins of a batch or a held-out set.

use std::path::Path;

use plotters::prelude::*;

use super::{draw_err, ensure_font, ensure_parent, finite_range, COLORS, FONT};
use crate::{Error, Result};

/// How a histogram looks.
#[derive(Debug, Clone)]
pub struct HistOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Number of equal-width bins between the smallest and largest value.
    pub bins: usize,
    /// Label of the x axis.
    pub x_label: String,
}

impl Default for HistOptions {
    fn default() -> Self {
        Self {
            width: 800,
            height: 500,
            bins: 30,
            x_label: String::new(),
        }
    }
}

/// Counts of `values` in `bins` equal-width bins over `[lo, hi]`; the last bin is closed.
pub(crate) fn bin_counts(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<usize> {
    let mut counts = vec![0usize; bins];
    let width = (hi - lo) / bins as f64;
    for &v in values.iter().filter(|v| v.is_finite()) {
        let bin = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        counts[bin] += 1;
    }
    counts
}

/// Draws a histogram of the finite `values` into a PNG at `path`, with a dashed line at zero
/// when zero lies in range (a margin's sign is what matters).
pub fn histogram(
    path: impl AsRef<Path>,
    title: &str,
    values: &[f64],
    opts: &HistOptions,
) -> Result<()> {
    let path = path.as_ref();
    if opts.bins == 0 {
        return Err(Error::invalid(
            "a histogram needs at least one bin, got bins = 0",
        ));
    }
    let Some((lo, hi)) = finite_range(values.iter().copied()) else {
        return Err(Error::invalid(format!(
            "{}: no finite value among {} to draw a histogram of",
            path.display(),
            values.len()
        )));
    };
    let counts = bin_counts(values, lo, hi, opts.bins);
    let width = (hi - lo) / opts.bins as f64;
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.08;

    ensure_font();
    ensure_parent(path)?;
    let root = BitMapBackend::new(path, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(opts.x_label.as_str())
        .y_desc("count")
        // Counts are whole numbers: at most one tick per count, none at fractions.
        .y_labels((top as usize + 1).clamp(2, 11))
        .y_label_formatter(&|y| format!("{}", y.round() as i64))
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    let fill = COLORS[0].mix(0.7).filled();
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], fill)
        }))
        .map_err(|e| draw_err(path, e))?;

    if lo < 0.0 && hi > 0.0 {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (0.0, top)],
                6,
                4,
                COLORS[3].stroke_width(2),
            ))
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}
