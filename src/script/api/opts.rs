//! Reading rhai option maps (`#{dtype: "f32", max_length: 512}`) with typed defaults and
//! errors that name the option.

use rhai::{Dynamic, EvalAltResult, Map};

use super::tensor::as_f64;
use crate::script::engine::script_err;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// Options of one call, with the function name for error messages.
pub struct Opts<'a> {
    map: &'a Map,
    func: &'static str,
}

impl<'a> Opts<'a> {
    /// Wraps `map`, the options of `func`.
    pub fn new(map: &'a Map, func: &'static str) -> Self {
        Self { map, func }
    }

    /// Fails on a key not in `known`, so a typo is never silently ignored.
    pub fn only(&self, known: &[&str]) -> RResult<&Self> {
        if let Some(bad) = self.map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(script_err(format!(
                "{}: unknown option `{bad}`; known: {}",
                self.func,
                known.join(", ")
            )));
        }
        Ok(self)
    }

    fn get(&self, key: &str) -> Option<&Dynamic> {
        self.map.get(key).filter(|v| !v.is_unit())
    }

    /// A number option.
    pub fn f64(&self, key: &str, default: f64) -> RResult<f64> {
        match self.get(key) {
            Some(v) => as_f64(v).ok_or_else(|| self.bad(key, "a number", v)),
            None => Ok(default),
        }
    }

    /// A non-negative integer option.
    pub fn usize(&self, key: &str, default: usize) -> RResult<usize> {
        self.opt_usize(key).map(|v| v.unwrap_or(default))
    }

    /// A non-negative integer option that may be absent.
    pub fn opt_usize(&self, key: &str) -> RResult<Option<usize>> {
        match self.get(key) {
            Some(v) => v
                .as_int()
                .ok()
                .and_then(|i| usize::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", v)),
            None => Ok(None),
        }
    }

    /// A boolean option.
    pub fn bool(&self, key: &str, default: bool) -> RResult<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().map_err(|_| self.bad(key, "true or false", v)),
            None => Ok(default),
        }
    }

    /// A string option.
    pub fn string(&self, key: &str, default: &str) -> RResult<String> {
        self.opt_string(key)
            .map(|v| v.unwrap_or_else(|| default.to_string()))
    }

    /// A string option that may be absent.
    pub fn opt_string(&self, key: &str) -> RResult<Option<String>> {
        match self.get(key) {
            Some(v) if v.is_string() => Ok(Some(v.to_string())),
            Some(v) => Err(self.bad(key, "a string", v)),
            None => Ok(None),
        }
    }

    /// An array-of-strings option.
    pub fn strings(&self, key: &str) -> RResult<Option<Vec<String>>> {
        match self.get(key) {
            Some(v) if v.is_array() => Ok(Some(
                v.clone()
                    .into_array()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            Some(v) if v.is_string() => Ok(Some(vec![v.to_string()])),
            Some(v) => Err(self.bad(key, "an array of strings", v)),
            None => Ok(None),
        }
    }

    /// The raw value of an option.
    pub fn raw(&self, key: &str) -> Option<&Dynamic> {
        self.get(key)
    }

    fn bad(&self, key: &str, what: &str, v: &Dynamic) -> Box<EvalAltResult> {
        script_err(format!(
            "{}: option `{key}` must be {what}, got {} ({v})",
            self.func,
            v.type_name()
        ))
    }
}
