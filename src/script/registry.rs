//! The one registry of script functions: each is registered with its signature, doc line and
//! a rhai example, and `help`, REPL completion and the README reference are generated from it.

use std::collections::BTreeSet;
use std::fmt::Write;

use rhai::{Engine, RhaiNativeFunc, Variant};

/// Documentation of one script function (one entry per overload family).
#[derive(Debug, Clone)]
pub struct FnDoc {
    /// The name scripts call (`load_model`, `+`, `shape`, ...).
    pub name: &'static str,
    /// The call forms, in rhai notation, e.g. `t.sum() -> f64`.
    pub signature: &'static str,
    /// The section of the reference this function belongs to (`tensor`, `model`, ...).
    pub category: &'static str,
    /// One sentence saying what it does.
    pub doc: &'static str,
    /// A short rhai example.
    pub example: &'static str,
}

/// Registers functions into a rhai [`Engine`] and records their documentation at the same time,
/// so that nothing can be exposed to scripts without its help text.
pub struct Api<'e> {
    engine: &'e mut Engine,
    docs: Vec<FnDoc>,
    category: &'static str,
}

impl<'e> Api<'e> {
    /// Starts registering into `engine`.
    pub fn new(engine: &'e mut Engine) -> Self {
        Self {
            engine,
            docs: Vec::new(),
            category: "general",
        }
    }

    /// Sets the reference section for the functions registered next.
    pub fn category(&mut self, category: &'static str) -> &mut Self {
        self.category = category;
        self
    }

    /// The engine being populated, for type registration and other engine settings.
    pub fn engine(&mut self) -> &mut Engine {
        self.engine
    }

    /// Records documentation for a name whose implementations are registered with
    /// [`Api::overload`] (operators, functions with several argument types).
    pub fn doc(
        &mut self,
        name: &'static str,
        signature: &'static str,
        doc: &'static str,
        example: &'static str,
    ) -> &mut Self {
        self.docs.push(FnDoc {
            name,
            signature,
            category: self.category,
            doc,
            example,
        });
        self
    }

    /// Registers one implementation of `name` without a new doc entry; the name must be
    /// documented once with [`Api::doc`] or [`Api::func`] (a test checks it).
    pub fn overload<
        A: 'static,
        const N: usize,
        const X: bool,
        R: Variant + Clone,
        const F: bool,
    >(
        &mut self,
        name: &'static str,
        func: impl RhaiNativeFunc<A, N, X, R, F> + 'static,
    ) -> &mut Self {
        self.engine.register_fn(name, func);
        self
    }

    /// Registers `func` as `name` together with its documentation.
    pub fn func<A: 'static, const N: usize, const X: bool, R: Variant + Clone, const F: bool>(
        &mut self,
        name: &'static str,
        signature: &'static str,
        doc: &'static str,
        example: &'static str,
        func: impl RhaiNativeFunc<A, N, X, R, F> + 'static,
    ) -> &mut Self {
        self.engine.register_fn(name, func);
        self.doc(name, signature, doc, example)
    }

    /// Finishes registration, returning the collected documentation.
    pub fn finish(self) -> Registry {
        Registry { docs: self.docs }
    }
}

/// The documentation of every function the host exposes.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    docs: Vec<FnDoc>,
}

impl Registry {
    /// Every entry, in registration order.
    pub fn entries(&self) -> &[FnDoc] {
        &self.docs
    }

    /// The entries documenting `name` (several when a name is documented per receiver type).
    pub fn lookup(&self, name: &str) -> Vec<&FnDoc> {
        self.docs.iter().filter(|d| d.name == name).collect()
    }

    /// The distinct documented names, sorted: what completion offers.
    pub fn names(&self) -> BTreeSet<&'static str> {
        self.docs.iter().map(|d| d.name).collect()
    }

    /// The documented name closest to `name`, when one is a letter or two away (a typo).
    pub fn closest(&self, name: &str) -> Option<&'static str> {
        closest_name(name, self.names())
    }

    /// Adds entries documented elsewhere (a later registration pass).
    pub fn extend(&mut self, other: Registry) {
        self.docs.extend(other.docs);
    }

    /// The `help` overview: every section with its functions' signatures and doc lines.
    pub fn help(&self) -> String {
        let mut out = String::from("Functions (help NAME for one with an example):\n");
        for category in self.categories() {
            let _ = writeln!(out, "\n[{category}]");
            for d in self.docs.iter().filter(|d| d.category == category) {
                let _ = writeln!(out, "  {:<44} {}", d.signature, d.doc);
            }
        }
        out
    }

    /// `help NAME`: the signatures, doc lines and examples of one name, or `None` when unknown.
    pub fn help_for(&self, name: &str) -> Option<String> {
        let found = self.lookup(name);
        if found.is_empty() {
            return None;
        }

        let mut out = String::new();
        for d in found {
            let _ = writeln!(out, "{}\n    {}\n  example:", d.signature, d.doc);
            for line in d.example.lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        Some(out)
    }

    /// The script reference in Markdown, one section per category, for the README.
    pub fn markdown(&self) -> String {
        let mut out =
            String::from("## Script reference\n\nGenerated by `ganpo-run --help-markdown`.\n");
        for category in self.categories() {
            let _ = writeln!(out, "\n### {category}\n");
            for d in self.docs.iter().filter(|d| d.category == category) {
                let _ = writeln!(out, "- `{}`: {}", d.signature, d.doc);
                let _ = writeln!(out, "  ```rhai");
                for line in d.example.lines() {
                    let _ = writeln!(out, "  {line}");
                }
                let _ = writeln!(out, "  ```");
            }
        }
        out
    }

    fn categories(&self) -> Vec<&'static str> {
        let mut seen = Vec::new();
        for d in &self.docs {
            if !seen.contains(&d.category) {
                seen.push(d.category);
            }
        }
        seen
    }
}

/// The script-visible name of a rhai signature string from `Engine::gen_fn_signatures`:
/// `get$shape(...)` is the property `shape`, `index$get$(...)` the indexer `[]`.
pub fn name_of_signature(signature: &str) -> String {
    let head = signature.split('(').next().unwrap_or(signature).trim();
    if head.starts_with("index$") {
        return "[]".to_string();
    }
    head.trim_start_matches("get$")
        .trim_start_matches("set$")
        .to_string()
}

/// The candidate closest to `name` other than `name` itself, when it is a letter or two away
/// (a typo); of equally close ones, the alphabetically first.
pub fn closest_name<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d > 0 && d <= 2)
        .min()
        .map(|(_, c)| c)
}

/// Levenshtein distance between two names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}
