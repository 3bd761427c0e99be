//! PNG plots of training runs: metric curves, histograms and PCA scatters from plain series.
//!
//! This layer depends on nothing else in the crate: it takes `Vec<f64>` series and writes PNG
//! files with plotters' bitmap backend. Text is drawn with the DejaVu Sans font embedded in
//! the binary (registered once, at the first plot), so no system font is ever needed.

mod curves;
mod hist;
mod pca;

pub use curves::{curves, ema, CurveOptions};
pub use hist::{histogram, HistOptions};
pub use pca::{pca, pca_scatter, scatter, Pca, ScatterOptions};

use std::path::Path;
use std::sync::Once;

use plotters::style::{FontStyle, RGBColor};

use crate::{Error, Result};

/// The font family name plots use; it is bound to the embedded DejaVu Sans.
pub(crate) const FONT: &str = "sans-serif";

/// Colours given to successive series or groups (colour-blind-safe Tableau 10).
pub(crate) const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

static REGISTER_FONT: Once = Once::new();

/// Registers the embedded DejaVu Sans under [`FONT`], once per process.
pub(crate) fn ensure_font() {
    REGISTER_FONT.call_once(|| {
        // The font is compiled in and known to be valid, so a failure here cannot happen in
        // practice; it would only make text invisible, never a crash.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Turns any plotters drawing error into the crate's error, naming the file being drawn.
pub(crate) fn draw_err(path: &Path, err: impl std::fmt::Display) -> Error {
    Error::Plot(format!("{}: {err}", path.display()))
}

/// Creates the parent folder of `path` when it does not exist yet.
pub(crate) fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
        }
        _ => Ok(()),
    }
}

/// The smallest and largest finite values of an iterator, widened when they coincide so that
/// an axis always has a non-empty range.
pub(crate) fn finite_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }

    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    Some((lo - pad, hi + pad))
}
