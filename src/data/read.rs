//! Containers of dataset records: JSON arrays, JSON Lines and Parquet (one file or a folder
//! of Hugging Face shards), streamed one record at a time so that a file is never held twice.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde_json::Value;

use crate::{Error, Result};

/// The kind of file records are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// One JSON array of records.
    JsonArray,
    /// One JSON record per line.
    JsonLines,
    /// An Apache Parquet file.
    Parquet,
}

impl Container {
    /// The container of `path`, from its extension (`.json`, `.jsonl`/`.ndjson`, `.parquet`).
    pub fn of(path: &Path) -> Option<Container> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" => Some(Container::JsonArray),
            "jsonl" | "ndjson" => Some(Container::JsonLines),
            "parquet" => Some(Container::Parquet),
            _ => None,
        }
    }
}

/// One record as read, before its format is interpreted.
#[derive(Debug)]
pub struct RawRecord {
    /// The file it comes from.
    pub path: PathBuf,
    /// Its 0-based index over all files of the dataset.
    pub index: usize,
    /// Its 1-based line, for JSON Lines.
    pub line: Option<usize>,
    /// The record, or why this one record could not be read (the others still can).
    pub value: std::result::Result<Value, String>,
}

/// The files of a dataset: `path` itself, or the data files of a folder whose name or parent
/// folder starts with `split` (`train_prefs-00000-of-00001.parquet`, `train_prefs/0.jsonl`),
/// in name order. Without a split, every data file of the folder is taken.
pub fn dataset_files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "dataset not found"),
            ));
        }
        return Ok(vec![path.to_path_buf()]);
    }

    let mut all = Vec::new();
    collect_data_files(path, &mut all)?;
    all.sort();
    let chosen: Vec<PathBuf> = match split {
        None => all.clone(),
        Some(split) => all
            .iter()
            .filter(|file| {
                file.strip_prefix(path)
                    .map(|rel| rel.iter().any(|part| starts_with_split(part, split)))
                    .unwrap_or(false)
            })
            .cloned()
            .collect(),
    };
    if chosen.is_empty() {
        let names: Vec<String> = all
            .iter()
            .map(|f| f.strip_prefix(path).unwrap_or(f).display().to_string())
            .collect();
        return Err(Error::invalid(format!(
            "{}: no data files for split {:?}; found: [{}]",
            path.display(),
            split.unwrap_or("(any)"),
            names.join(", ")
        )));
    }
    Ok(chosen)
}

/// Whether a path component names `split` (`train_prefs`, `train_prefs-00000-of-00002.parquet`),
/// not a longer split sharing its start (`train_prefs_extra`).
fn starts_with_split(part: &std::ffi::OsStr, split: &str) -> bool {
    let name = part.to_string_lossy();
    match name.strip_prefix(split) {
        Some(rest) => rest.is_empty() || rest.starts_with(['-', '.']),
        None => false,
    }
}

fn collect_data_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_data_files(&path, out)?;
        } else if Container::of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Calls `each` on the records of `path` (at most `max_records`, then reading stops),
/// numbering them from `first_index`; returns the number of records read.
pub fn for_each_record(
    path: &Path,
    first_index: usize,
    max_records: Option<usize>,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let max = max_records.unwrap_or(usize::MAX);
    match Container::of(path) {
        Some(Container::JsonArray) => read_json_array(path, first_index, max, each),
        Some(Container::JsonLines) => read_json_lines(path, first_index, max, each),
        Some(Container::Parquet) => read_parquet(path, first_index, max, each),
        None => Err(Error::invalid(format!(
            "{}: unknown dataset container; expected .json, .jsonl or .parquet",
            path.display()
        ))),
    }
}

fn read_json_array(
    path: &Path,
    first_index: usize,
    max: usize,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut deserializer = serde_json::Deserializer::from_reader(BufReader::new(file));
    let mut failure = None;
    let mut stopped_at = None;
    let visitor = EachElement {
        path,
        first_index,
        max,
        each,
        failure: &mut failure,
        stopped_at: &mut stopped_at,
    };

    // TODO: a JSON array with non-UTF-8 bytes or a syntax error is fatal even with
    // `on_invalid = skip`: the parser cannot find the next record after it (JSONL can).
    let outcome = visitor.deserialize(&mut deserializer).and_then(|count| {
        deserializer.end()?;
        Ok(count)
    });
    match (outcome, failure) {
        (_, Some(err)) => Err(err),
        (Err(_), None) if stopped_at.is_some() => Ok(stopped_at.unwrap_or(max)),
        (Ok(count), None) => Ok(count),
        (Err(e), None) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        }),
    }
}

/// Streams the elements of a JSON array to a callback, one parsed element at a time.
struct EachElement<'a, 'f> {
    path: &'a Path,
    first_index: usize,
    max: usize,
    each: &'a mut dyn FnMut(RawRecord) -> Result<()>,
    failure: &'f mut Option<Error>,
    stopped_at: &'f mut Option<usize>,
}

impl<'de> DeserializeSeed<'de> for EachElement<'_, '_> {
    type Value = usize;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<usize, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EachElement<'_, '_> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<usize, A::Error> {
        let mut count = 0;
        while count < self.max {
            let Some(value) = seq.next_element::<Value>()? else {
                return Ok(count);
            };
            let record = RawRecord {
                path: self.path.to_path_buf(),
                index: self.first_index + count,
                line: None,
                value: Ok(value),
            };
            if let Err(err) = (self.each)(record) {
                *self.failure = Some(err);
                return Err(A::Error::custom("stopped by a record error"));
            }
            count += 1;
        }
        *self.stopped_at = Some(count);
        Err(A::Error::custom("stopped after the record limit"))
    }
}

fn read_json_lines(
    path: &Path,
    first_index: usize,
    max: usize,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut bytes = Vec::new();
    let mut line = 0;
    let mut count = 0;

    while count < max {
        bytes.clear();
        let read = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        line += 1;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }

        let value = match std::str::from_utf8(&bytes) {
            Err(e) => Err(format!(
                "text is not valid UTF-8 (byte {})",
                e.valid_up_to()
            )),
            Ok(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                // serde counts lines within this one line of the file: give the column only.
                let position = format!(" at line {} column {}", e.line(), e.column());
                let message = e.to_string();
                let message = message.strip_suffix(&position).unwrap_or(&message);
                format!("malformed JSON: {message} (column {})", e.column())
            }),
        };
        each(RawRecord {
            path: path.to_path_buf(),
            index: first_index + count,
            line: Some(line),
            value,
        })?;
        count += 1;
    }
    Ok(count)
}

fn read_parquet(
    path: &Path,
    first_index: usize,
    max: usize,
    each: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<usize> {
    let parse_error = |e: parquet::errors::ParquetError| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: e.to_string(),
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(parse_error)?;
    let rows = reader.get_row_iter(None).map_err(parse_error)?;

    let mut count = 0;
    for row in rows.take(max) {
        let row = row.map_err(parse_error)?;
        let mut object = serde_json::Map::new();
        let mut problem = None;
        for (name, field) in row.get_column_iter() {
            match field_to_json(field) {
                Ok(value) => {
                    object.insert(name.clone(), value);
                }
                Err(msg) => problem = Some(format!("column `{name}`: {msg}")),
            }
        }
        each(RawRecord {
            path: path.to_path_buf(),
            index: first_index + count,
            line: None,
            value: problem.map_or(Ok(Value::Object(object)), Err),
        })?;
        count += 1;
    }
    Ok(count)
}

/// A Parquet field as JSON; binary that is not UTF-8 text is an error.
fn field_to_json(field: &Field) -> std::result::Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float(x) => Value::from(f64::from(*x)),
        Field::Double(x) => Value::from(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
            Ok(text) => Value::String(text.to_string()),
            Err(e) => {
                return Err(format!(
                    "text is not valid UTF-8 (byte {})",
                    e.valid_up_to()
                ))
            }
        },
        Field::Group(row) => {
            let mut object = serde_json::Map::new();
            for (name, inner) in row.get_column_iter() {
                object.insert(name.clone(), field_to_json(inner)?);
            }
            Value::Object(object)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(field_to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut object = serde_json::Map::new();
            for (key, value) in map.entries() {
                let key = match field_to_json(key)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                object.insert(key, field_to_json(value)?);
            }
            Value::Object(object)
        }
        other => Value::String(other.to_string()),
    })
}
