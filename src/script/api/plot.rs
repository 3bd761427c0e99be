//! Script functions that draw PNG plots under --out: curves, histograms and PCA scatters.

use std::rc::Rc;

use rhai::{Array, Dynamic, EvalAltResult, Map};

use super::tensor::{as_f64, TensorHandle};
use crate::plot::{self, CurveOptions, HistOptions, ScatterOptions};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// A flat list of numbers from an array of numbers or a tensor.
pub fn numbers(value: &Dynamic, what: &str) -> RResult<Vec<f64>> {
    if let Some(t) = value.clone().try_cast::<TensorHandle>() {
        let flat =
            t.0.flatten_all()
                .and_then(|f| f.to_dtype(candle_core::DType::F64));
        return flat.and_then(|f| f.to_vec1::<f64>()).map_err(script_err);
    }
    let Some(items) = value.read_lock::<Array>() else {
        return Err(script_err(format!(
            "{what}: expected an array or a Tensor, got {}",
            value.type_name()
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            as_f64(v).ok_or_else(|| {
                script_err(format!("{what}[{i}] is a {}, not a number", v.type_name()))
            })
        })
        .collect()
}

/// Rows of numbers from an array of arrays or a 2-D tensor.
pub fn rows(value: &Dynamic, what: &str) -> RResult<Vec<Vec<f64>>> {
    if let Some(t) = value.clone().try_cast::<TensorHandle>() {
        let t = t.0.to_dtype(candle_core::DType::F64).map_err(script_err)?;
        return t.to_vec2::<f64>().map_err(|e| {
            script_err(format!(
                "{what}: expected a 2-D tensor, got shape {:?}: {e}",
                t.dims()
            ))
        });
    }
    let Some(items) = value.read_lock::<Array>() else {
        return Err(script_err(format!(
            "{what}: expected an array of rows or a 2-D Tensor"
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, r)| numbers(r, &format!("{what}[{i}]")))
        .collect()
}

fn opt_f64(opts: &Map, key: &str, default: f64) -> RResult<f64> {
    match opts.get(key) {
        Some(v) => as_f64(v).ok_or_else(|| script_err(format!("option `{key}` must be a number"))),
        None => Ok(default),
    }
}

fn opt_str(opts: &Map, key: &str, default: &str) -> String {
    opts.get(key)
        .map(|v| v.to_string())
        .unwrap_or_else(|| default.to_string())
}

/// Registers the plotting functions.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.category("plot");

    let c = ctx.clone();
    api.func(
        "plot_curves",
        "plot_curves(path, title, series_map, opts) -> string",
        "Draws named series (raw faint, EMA-smoothed solid) into a PNG; \
         opts: smoothing, width, height, x_label, y_label.",
        "plot_curves(\"loss.png\", \"loss\", #{dpo: losses}, #{smoothing: 0.8});",
        move |path: &str, title: &str, series: Map, opts: Map| -> RResult<String> {
            let file = c.writable(path).map_err(script_err)?;
            let mut named = Vec::new();
            for (name, values) in &series {
                named.push((name.to_string(), numbers(values, name)?));
            }
            let options = CurveOptions {
                width: opt_f64(&opts, "width", 800.0)? as u32,
                height: opt_f64(&opts, "height", 500.0)? as u32,
                smoothing: opt_f64(&opts, "smoothing", 0.6)?,
                x_label: opt_str(&opts, "x_label", "step"),
                y_label: opt_str(&opts, "y_label", ""),
            };
            plot::curves(&file, title, &named, &options).map_err(script_err)?;
            Ok(file.display().to_string())
        },
    );
    let c = ctx.clone();
    api.func(
        "plot_histogram",
        "plot_histogram(path, title, values, opts) -> string",
        "Draws a histogram of numbers (array or Tensor) into a PNG; \
         opts: bins, width, height, x_label.",
        "plot_histogram(\"margins.png\", \"rewards/margins\", margins, #{bins: 30});",
        move |path: &str, title: &str, values: Dynamic, opts: Map| -> RResult<String> {
            let file = c.writable(path).map_err(script_err)?;
            let options = HistOptions {
                width: opt_f64(&opts, "width", 800.0)? as u32,
                height: opt_f64(&opts, "height", 500.0)? as u32,
                bins: opt_f64(&opts, "bins", 30.0)? as usize,
                x_label: opt_str(&opts, "x_label", ""),
            };
            let values = numbers(&values, "values")?;
            plot::histogram(&file, title, &values, &options).map_err(script_err)?;
            Ok(file.display().to_string())
        },
    );
    let c = ctx.clone();
    api.func(
        "plot_pca",
        "plot_pca(path, title, points, labels, opts) -> map",
        "Projects rows (array of arrays or [N, d] Tensor) on 2 principal components and \
         scatters them by label; returns #{path, explained}.",
        "let r = plot_pca(\"pca.png\", \"hidden states\", pooled, labels, #{});\n\
         print(r.explained);",
        move |path: &str, title: &str, points: Dynamic, labels: Array, opts: Map| -> RResult<Map> {
            let file = c.writable(path).map_err(script_err)?;
            let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            let options = ScatterOptions {
                width: opt_f64(&opts, "width", 700.0)? as u32,
                height: opt_f64(&opts, "height", 600.0)? as u32,
                ..Default::default()
            };
            let fit = plot::pca_scatter(&file, title, &rows(&points, "points")?, &labels, &options)
                .map_err(script_err)?;
            let mut out = Map::new();
            out.insert("path".into(), file.display().to_string().into());
            let explained: Array = fit
                .explained
                .iter()
                .map(|&e| Dynamic::from_float(e))
                .collect();
            out.insert("explained".into(), explained.into());
            Ok(out)
        },
    );
    api.func(
        "pca",
        "pca(points, k) -> map",
        "Principal components of rows: #{components, explained, projected, mean}.",
        "let p = pca(pooled, 2);\nprint(p.explained);",
        |points: Dynamic, k: i64| -> RResult<Map> {
            let fit =
                plot::pca(&rows(&points, "points")?, k.max(1) as usize).map_err(script_err)?;
            let nested = |m: &Vec<Vec<f64>>| -> Array {
                m.iter()
                    .map(|r| {
                        Dynamic::from_array(r.iter().map(|&x| Dynamic::from_float(x)).collect())
                    })
                    .collect()
            };
            let flat =
                |v: &Vec<f64>| -> Array { v.iter().map(|&x| Dynamic::from_float(x)).collect() };
            let mut out = Map::new();
            out.insert("components".into(), nested(&fit.components).into());
            out.insert("projected".into(), nested(&fit.projected).into());
            out.insert("explained".into(), flat(&fit.explained).into());
            out.insert("mean".into(), flat(&fit.mean).into());
            Ok(out)
        },
    );
    api.func(
        "ema",
        "ema(values, weight) -> array",
        "Bias-corrected exponential moving average of numbers (TensorBoard smoothing).",
        "let smooth = ema(losses, 0.9);",
        |values: Dynamic, weight: f64| -> RResult<Array> {
            let v = numbers(&values, "values")?;
            Ok(plot::ema(&v, weight)
                .into_iter()
                .map(Dynamic::from_float)
                .collect())
        },
    );
    let c = ctx.clone();
    api.func(
        "plot_metrics",
        "plot_metrics(metrics_jsonl, names, png) -> string",
        "Reads the named metrics from a metrics.jsonl file and draws them as smoothed curves.",
        "let names = [\"loss\", \"rewards/accuracies\"];\n\
         plot_metrics(out_path(\"metrics.jsonl\"), names, \"metrics.png\");",
        move |jsonl: &str, names: Array, png: &str| -> RResult<String> {
            let file = c.writable(png).map_err(script_err)?;
            let text =
                std::fs::read_to_string(jsonl).map_err(|e| script_err(format!("{jsonl}: {e}")))?;
            let mut named: Vec<(String, Vec<f64>)> =
                names.iter().map(|n| (n.to_string(), Vec::new())).collect();
            for (line_no, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let record: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| script_err(format!("{jsonl}:{}: {e}", line_no + 1)))?;
                for (name, values) in named.iter_mut() {
                    if let Some(x) = record.get(name.as_str()).and_then(|v| v.as_f64()) {
                        values.push(x);
                    }
                }
            }
            plot::curves(&file, "metrics", &named, &CurveOptions::default()).map_err(script_err)?;
            Ok(file.display().to_string())
        },
    );
}
