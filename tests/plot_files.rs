//! Every plot is written as a valid PNG of the requested size, and PCA finds known structure.

use std::path::Path;

use ganpo::plot::{self, CurveOptions, HistOptions, ScatterOptions};

/// Reads a PNG's signature and IHDR chunk, returning (width, height).
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).expect("plot file exists");
    assert!(
        bytes.len() > 33,
        "{} is too short to be a PNG",
        path.display()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "PNG signature of {}",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk of {}", path.display());
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (width, height)
}

/// A scratch folder; set `GANPO_PLOT_DIR` to keep the plots and look at them.
fn out_dir() -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    match std::env::var_os("GANPO_PLOT_DIR") {
        Some(dir) => (None, dir.into()),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().to_path_buf();
            (Some(tmp), path)
        }
    }
}

#[test]
fn metric_curves_are_written_as_png_of_the_requested_size() {
    let (_guard, dir) = out_dir();
    let path = dir.join("nested/loss.png");
    let noisy: Vec<f64> = (0..200)
        .map(|i| (-(i as f64) / 50.0).exp() + 0.1 * (i as f64).sin())
        .collect();
    let other: Vec<f64> = (0..150)
        .map(|i| 0.5 + 0.2 * (i as f64 / 9.0).cos())
        .collect();
    let opts = CurveOptions {
        width: 640,
        height: 400,
        ..Default::default()
    };

    plot::curves(
        &path,
        "loss",
        &[("dpo".into(), noisy), ("ganpo".into(), other)],
        &opts,
    )
    .unwrap();

    assert_eq!(png_size(&path), (640, 400));
}

#[test]
fn margin_histogram_is_written_as_png_of_the_requested_size() {
    let (_guard, dir) = out_dir();
    let path = dir.join("margins.png");
    let margins: Vec<f64> = (0..500)
        .map(|i| ((i * 37 % 101) as f64 - 40.0) / 10.0)
        .collect();
    let opts = HistOptions {
        width: 500,
        height: 300,
        bins: 25,
        x_label: "margin".into(),
    };

    plot::histogram(&path, "rewards/margins", &margins, &opts).unwrap();

    assert_eq!(png_size(&path), (500, 300));
}

#[test]
fn pca_scatter_is_written_as_png_of_the_requested_size() {
    let (_guard, dir) = out_dir();
    let path = dir.join("pca.png");
    let groups = [
        "policy chosen",
        "policy rejected",
        "reference chosen",
        "reference rejected",
    ];
    let mut points = Vec::new();
    let mut labels = Vec::new();
    for (g, name) in groups.iter().enumerate() {
        for i in 0..20 {
            points.push(
                (0..16)
                    .map(|j| g as f64 * 2.0 + ((i * j) % 5) as f64 * 0.1)
                    .collect(),
            );
            labels.push(name.to_string());
        }
    }
    let opts = ScatterOptions {
        width: 600,
        height: 600,
        ..Default::default()
    };

    let fit = plot::pca_scatter(&path, "hidden states", &points, &labels, &opts).unwrap();

    assert_eq!(png_size(&path), (600, 600));
    assert_eq!(fit.projected.len(), 80);
}

#[test]
fn pca_recovers_the_direction_of_points_on_a_line() {
    // Points t·(3, 4, 0)/5 plus a small orthogonal wobble along z: the first component must be
    // ±(0.6, 0.8, 0) up to the wobble's tiny correlation with t, and explain almost all of the
    // variance (expected values by construction).
    let points: Vec<Vec<f64>> = (0..50)
        .map(|i| {
            let t = i as f64 - 25.0;
            vec![0.6 * t, 0.8 * t, 0.01 * ((i % 3) as f64 - 1.0)]
        })
        .collect();

    let fit = plot::pca(&points, 2).unwrap();

    let c = &fit.components[0];
    let sign = c[0].signum();
    assert!(
        (c[0] * sign - 0.6).abs() < 1e-6 && (c[1] * sign - 0.8).abs() < 1e-6,
        "{c:?}"
    );
    assert!(c[2].abs() < 1e-4, "{c:?}");
    assert!(fit.explained[0] > 0.9999, "{:?}", fit.explained);
    assert!(
        fit.components[1][2].abs() > 0.999,
        "second component {:?}",
        fit.components[1]
    );
}

#[test]
fn ema_starts_at_the_first_value_and_zero_smoothing_is_identity() {
    let values = [1.0, 3.0, 2.0, 8.0];

    assert_eq!(plot::ema(&values, 0.0), values.to_vec());
    let smoothed = plot::ema(&values, 0.5);
    assert_eq!(smoothed[0], 1.0);
    // Debiased EMA by hand: (0.5·0.5 + 0.5·3) / (1 − 0.25) = 1.75 / 0.75.
    assert!((smoothed[1] - 1.75 / 0.75).abs() < 1e-12);
}

#[test]
fn plotting_only_non_finite_values_is_an_error_naming_the_file() {
    let (_guard, dir) = out_dir();
    let path = dir.join("nan.png");

    let err = plot::histogram(&path, "nan", &[f64::NAN], &HistOptions::default()).unwrap_err();

    assert!(err.to_string().contains("nan.png"), "{err}");
}
