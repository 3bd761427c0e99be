//! Principal component analysis on plain vectors, and labelled 2-D scatter plots of it.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::{draw_err, ensure_font, ensure_parent, finite_range, COLORS, FONT};
use crate::{Error, Result};

/// The result of [`pca`]: the leading principal directions and every point projected on them.
#[derive(Debug, Clone)]
pub struct Pca {
    /// Mean of the points, subtracted before projecting.
    pub mean: Vec<f64>,
    /// Unit-norm principal directions, largest variance first.
    pub components: Vec<Vec<f64>>,
    /// Fraction of the total variance each component explains.
    pub explained: Vec<f64>,
    /// Coordinates of every input point on the components, one row per point.
    pub projected: Vec<Vec<f64>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalize(v: &mut [f64]) -> f64 {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    norm
}

/// The leading `k` principal components of `points` (rows of equal length), found by power
/// iteration on the centred data with deflation: `O(iterations × n × d)` time and no `d × d`
/// matrix, so pooled hidden states of any width are cheap. Deterministic for a given input.
pub fn pca(points: &[Vec<f64>], k: usize) -> Result<Pca> {
    let n = points.len();
    let d = points.first().map(Vec::len).unwrap_or(0);
    if n < 2 || d == 0 {
        return Err(Error::invalid(format!(
            "PCA needs at least 2 points of dimension >= 1, got {n} points of dimension {d}"
        )));
    }
    if let Some((i, p)) = points.iter().enumerate().find(|(_, p)| p.len() != d) {
        return Err(Error::ShapeMismatch {
            name: format!("PCA point {i}"),
            expected: vec![d],
            got: vec![p.len()],
        });
    }
    let k = k.min(d).min(n);

    let mut mean = vec![0.0; d];
    for p in points {
        mean.iter_mut().zip(p).for_each(|(m, x)| *m += x / n as f64);
    }
    let centred: Vec<Vec<f64>> = points
        .iter()
        .map(|p| p.iter().zip(&mean).map(|(x, m)| x - m).collect())
        .collect();
    let total: f64 = centred.iter().map(|c| dot(c, c)).sum();

    let mut components: Vec<Vec<f64>> = Vec::with_capacity(k);
    let mut variances = Vec::with_capacity(k);
    for c in 0..k {
        // A fixed, non-symmetric start vector keeps the result reproducible.
        let mut v: Vec<f64> = (0..d)
            .map(|j| 1.0 + ((j * 7 + c * 13) % 11) as f64 / 10.0)
            .collect();
        normalize(&mut v);
        let mut eigen = 0.0;
        for _ in 0..500 {
            let mut next = vec![0.0; d];
            for row in &centred {
                let s = dot(row, &v);
                next.iter_mut().zip(row).for_each(|(acc, x)| *acc += s * x);
            }
            for prev in &components {
                let s = dot(&next, prev);
                next.iter_mut().zip(prev).for_each(|(x, p)| *x -= s * p);
            }
            let norm = normalize(&mut next);
            let converged = (norm - eigen).abs() <= 1e-12 * norm.max(1.0);
            eigen = norm;
            v = next;
            if converged || norm == 0.0 {
                break;
            }
        }
        variances.push(eigen);
        components.push(v);
    }

    let explained = variances
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    let projected = centred
        .iter()
        .map(|row| components.iter().map(|c| dot(row, c)).collect())
        .collect();
    Ok(Pca {
        mean,
        components,
        explained,
        projected,
    })
}

/// How a scatter plot looks.
#[derive(Debug, Clone)]
pub struct ScatterOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
}

impl Default for ScatterOptions {
    fn default() -> Self {
        Self {
            width: 700,
            height: 600,
            x_label: "x".to_string(),
            y_label: "y".to_string(),
        }
    }
}

/// Draws 2-D points into a PNG at `path`, one colour per distinct group label (in the order the
/// labels first appear), with a legend.
pub fn scatter(
    path: impl AsRef<Path>,
    title: &str,
    points: &[(f64, f64)],
    groups: &[String],
    opts: &ScatterOptions,
) -> Result<()> {
    let path = path.as_ref();
    if points.len() != groups.len() {
        return Err(Error::ShapeMismatch {
            name: "scatter group labels".to_string(),
            expected: vec![points.len()],
            got: vec![groups.len()],
        });
    }
    let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (
        finite_range(points.iter().map(|p| p.0)),
        finite_range(points.iter().map(|p| p.1)),
    ) else {
        return Err(Error::invalid(format!(
            "{}: no finite point among {} to scatter",
            path.display(),
            points.len()
        )));
    };
    let mut order: Vec<&str> = Vec::new();
    let mut by_group: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (p, g) in points.iter().zip(groups) {
        if !by_group.contains_key(g.as_str()) {
            order.push(g);
        }
        by_group.entry(g).or_default().push(*p);
    }

    ensure_font();
    ensure_parent(path)?;
    let root = BitMapBackend::new(path, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(opts.x_label.as_str())
        .y_desc(opts.y_label.as_str())
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    for (i, name) in order.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts = &by_group[name];
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .map(|&p| Circle::new(p, 4, color.mix(0.75).filled())),
            )
            .map_err(|e| draw_err(path, e))?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
    }

    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}

/// Projects `points` on their first two principal components and scatters them by group
/// (e.g. "policy chosen", "reference rejected"); returns the PCA so the caller can report the
/// explained variance.
pub fn pca_scatter(
    path: impl AsRef<Path>,
    title: &str,
    points: &[Vec<f64>],
    groups: &[String],
    opts: &ScatterOptions,
) -> Result<Pca> {
    let fit = pca(points, 2)?;
    let xy: Vec<(f64, f64)> = fit
        .projected
        .iter()
        .map(|p| (p[0], p.get(1).copied().unwrap_or(0.0)))
        .collect();
    let explained = |i: usize| fit.explained.get(i).copied().unwrap_or(0.0) * 100.0;
    let opts = ScatterOptions {
        x_label: format!("PC1 ({:.1}%)", explained(0)),
        y_label: format!("PC2 ({:.1}%)", explained(1)),
        ..opts.clone()
    };
    scatter(path, title, &xy, groups, &opts)?;
    Ok(fit)
}
