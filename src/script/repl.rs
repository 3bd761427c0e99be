//! What the interactive session needs from the host, kept free of terminal code: whether an
//! input is an unfinished block, and completion candidates for a cursor position.

use std::collections::BTreeSet;

use rhai::{Engine, LexError, ParseErrorType};

/// Whether `source` fails to parse only because it stops early (an open block, array, map,
/// call or backtick string), so the REPL should read another line instead of reporting.
pub fn is_incomplete(engine: &Engine, source: &str) -> bool {
    let Err(err) = engine.compile(source) else {
        return false;
    };

    let pos = err.position();
    let trimmed = source.trim_end();
    let last_line = trimmed.lines().count().max(1);
    let last_len = trimmed
        .lines()
        .last()
        .map(|l| l.chars().count())
        .unwrap_or(0);
    let at_end = pos.line() == Some(last_line) && pos.position().is_some_and(|c| c > last_len);
    match err.err_type() {
        ParseErrorType::UnexpectedEOF => true,
        ParseErrorType::MissingToken(..) => at_end,
        ParseErrorType::BadInput(LexError::UnterminatedString) => {
            source.matches('`').count() % 2 == 1
        }
        _ => false,
    }
}

/// Names a completion can draw from.
#[derive(Debug, Clone, Default)]
pub struct Completions {
    /// Free functions and keywords.
    pub functions: BTreeSet<String>,
    /// Methods and properties (offered after a `.`).
    pub methods: BTreeSet<String>,
    /// Variables in the session scope.
    pub variables: BTreeSet<String>,
}

/// The start of the word under the cursor and the candidates that extend it: methods after
/// a `.`, otherwise variables, functions and REPL commands.
pub fn complete(line: &str, cursor: usize, names: &Completions) -> (usize, Vec<String>) {
    let before = &line[..cursor.min(line.len())];
    let start = before
        .char_indices()
        .rev()
        .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == ':'))
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or(0);
    let word = &before[start..];
    let after_dot = before[..start].ends_with('.');

    let pool: Vec<&String> = if after_dot {
        names.methods.iter().collect()
    } else {
        names
            .variables
            .iter()
            .chain(names.functions.iter())
            .collect()
    };
    let mut found: Vec<String> = pool
        .into_iter()
        .filter(|n| n.starts_with(word))
        .cloned()
        .collect();
    found.dedup();
    (start, found)
}
