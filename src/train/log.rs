//! The metrics log: `metrics.jsonl`, one JSON object per optimizer step with the step, the
//! epoch, the learning rates, the elapsed time and every metric.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// File name of the log inside a run's output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one line per step to `metrics.jsonl`, flushed at once so a crash loses nothing.
#[derive(Debug)]
pub struct MetricsLogger {
    path: PathBuf,
    file: File,
    start: Instant,
    elapsed_offset: f64,
}

impl MetricsLogger {
    /// Starts a new log in `dir` (an existing one is replaced).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(METRICS_FILE);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file,
            start: Instant::now(),
            elapsed_offset: 0.0,
        })
    }

    /// Continues the log in `dir` after a resume from `step`: lines past `step` (written
    /// after the checkpoint by the interrupted run) are dropped, and the elapsed time goes on
    /// from the last kept line.
    pub fn resume(dir: &Path, step: usize) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let kept: Vec<Map<String, Value>> = if path.exists() {
            read_metrics(&path)?
                .into_iter()
                .filter(|m| {
                    m.get("step")
                        .and_then(Value::as_u64)
                        .is_some_and(|s| s as usize <= step)
                })
                .collect()
        } else {
            vec![]
        };
        let elapsed_offset = kept
            .last()
            .and_then(|m| m.get("elapsed_s"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0);

        let mut logger = Self::create(dir)?;
        logger.elapsed_offset = elapsed_offset;
        for line in kept {
            logger.write_line(&Value::Object(line))?;
        }
        Ok(logger)
    }

    /// Where the log is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seconds since the run started (across resumes).
    pub fn elapsed(&self) -> f64 {
        self.elapsed_offset + self.start.elapsed().as_secs_f64()
    }

    /// Writes the line of one step: `step`, `epoch`, each learning rate (e.g. `lr`,
    /// `disc_lr`), `elapsed_s`, then every metric. Non-finite values are written as null.
    pub fn log(
        &mut self,
        step: usize,
        epoch: f64,
        learning_rates: &BTreeMap<String, f64>,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), Value::from(step));
        line.insert("epoch".into(), number(epoch));
        for (k, v) in learning_rates {
            line.insert(k.clone(), number(*v));
        }
        line.insert("elapsed_s".into(), number(self.elapsed()));
        for (k, v) in metrics {
            line.entry(k.clone()).or_insert_with(|| number(*v));
        }
        self.write_line(&Value::Object(line))
    }

    fn write_line(&mut self, line: &Value) -> Result<()> {
        let text = serde_json::to_string(line)
            .map_err(|e| Error::invalid(format!("metrics line: {e}")))?;
        writeln!(self.file, "{text}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Reads a `metrics.jsonl` back, one object per line; a bad line is an error naming the file
/// and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parse_error = |msg: String| Error::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            msg,
        };
        match serde_json::from_str(&line).map_err(|e| parse_error(e.to_string()))? {
            Value::Object(m) => out.push(m),
            _ => return Err(parse_error("not a JSON object".into())),
        }
    }
    Ok(out)
}
