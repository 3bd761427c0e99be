//! The scripting host: a rhai engine with the crate's API, limits, sandboxed writes, `--set`
//! configuration, interruption and progress reporting.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, Map, Position, Scope, AST};

use super::registry::{name_of_signature, Api, Registry};
use super::repl::Completions;
use crate::{Error, Result};

/// What a script run is allowed to do and where it writes.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Folder that relative output paths resolve into, and the only place writes may go
    /// unless `allow_write_anywhere` is set.
    pub out_dir: PathBuf,
    /// Lets scripts write outside `out_dir`.
    pub allow_write_anywhere: bool,
    /// Most rhai operations a run may perform (0 = unlimited).
    pub max_operations: u64,
    /// Deepest script call nesting allowed.
    pub max_call_depth: usize,
    /// Device new tensors and models go to.
    pub device: Device,
    /// Seed of the host's random generator (tensors, sampling, data order).
    pub seed: u64,
    /// `--set key=value` pairs, visible to scripts as the `config` map and through `cfg`.
    pub config: BTreeMap<String, String>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("out"),
            allow_write_anywhere: false,
            max_operations: 0,
            max_call_depth: 64,
            device: Device::Cpu,
            seed: 42,
            config: BTreeMap::new(),
        }
    }
}

/// Receives progress of long loops; the binaries draw bars, the library itself never prints.
pub trait ProgressSink {
    /// A bar `id` with `total` steps and a label starts.
    fn start(&self, id: u64, total: u64, label: &str);
    /// Bar `id` advanced by `delta` steps, with an optional status message.
    fn advance(&self, id: u64, delta: u64, message: &str);
    /// Bar `id` is done.
    fn finish(&self, id: u64);
}

/// A sink that ignores progress (the default, and what tests use).
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn start(&self, _id: u64, _total: u64, _label: &str) {}
    fn advance(&self, _id: u64, _delta: u64, _message: &str) {}
    fn finish(&self, _id: u64) {}
}

/// State shared by every registered function of one host.
pub struct HostContext {
    /// The options the host was built with.
    pub options: HostOptions,
    /// Set by Ctrl-C; the script stops at its next interruption point
    /// ([`HostContext::interruption_point`]).
    pub interrupt: Arc<AtomicBool>,
    /// The host's random generator.
    pub rng: RefCell<StdRng>,
    /// Where progress goes.
    pub progress: RefCell<Box<dyn ProgressSink>>,
    /// Script closures to run after an interruption (e.g. writing a checkpoint).
    pub interrupt_hooks: RefCell<Vec<FnPtr>>,
    /// The folder of the newest checkpoint `save_checkpoint` wrote.
    pub last_checkpoint: RefCell<Option<PathBuf>>,
    /// When the host was created; `elapsed()` counts from here.
    pub started: Instant,
    next_progress_id: RefCell<u64>,
}

/// How long script code may keep running after a Ctrl-C before it is stopped wherever it is,
/// when it reaches no interruption point (a loop of script code alone, say).
const INTERRUPT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl HostContext {
    /// An interruption point: after a Ctrl-C, functions that start work which changes the
    /// training state or takes long (drawing a batch, a training step, an evaluation,
    /// generation, a training loop) stop the script here, before they begin. The statements
    /// after the running step (logging it, counting it) still run, so that an
    /// `on_interrupt` checkpoint holds the state of the steps it counts.
    pub fn interruption_point(&self) -> std::result::Result<(), Box<EvalAltResult>> {
        if self.interrupt.load(Ordering::Relaxed) {
            return Err(Box::new(EvalAltResult::ErrorTerminated(
                Dynamic::from("interrupted"),
                Position::NONE,
            )));
        }
        Ok(())
    }

    /// The path a script may write `path` to: relative paths land under `out_dir`; anything
    /// outside `out_dir` is refused unless writes anywhere are allowed.
    pub fn writable(&self, path: &str) -> Result<PathBuf> {
        let out = &self.options.out_dir;
        let given = Path::new(path);
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            out.join(given)
        };
        let resolved = normalize(&joined);
        if self.options.allow_write_anywhere || resolved.starts_with(normalize(out)) {
            return Ok(resolved);
        }
        Err(Error::invalid(format!(
            "refusing to write {}: outside the output folder {} (--allow-write-anywhere lifts \
             this)",
            resolved.display(),
            out.display()
        )))
    }

    /// A fresh id for a progress bar.
    pub fn progress_id(&self) -> u64 {
        let mut next = self.next_progress_id.borrow_mut();
        *next += 1;
        *next
    }
}

/// Removes `.` and resolves `..` lexically, so `out/../x` cannot pass as inside `out`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A `--set` value as the script sees it: integer, float, bool, or else the string itself.
pub fn parse_config_value(raw: &str) -> Dynamic {
    if let Ok(i) = raw.parse::<i64>() {
        return Dynamic::from_int(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        return Dynamic::from_float(f);
    }
    match raw {
        "true" => Dynamic::from_bool(true),
        "false" => Dynamic::from_bool(false),
        _ => Dynamic::from(raw.to_string()),
    }
}

/// A rhai engine with the whole GANPO API registered, plus the scope that keeps a session's
/// variables between evaluations.
pub struct Host {
    engine: Engine,
    registry: Registry,
    ctx: Rc<HostContext>,
    scope: Scope<'static>,
    lib: AST,
}

impl Host {
    /// Builds an engine with every API function, the limits of `options`, and a scope holding
    /// the `config` map (from `--set`).
    pub fn new(options: HostOptions) -> Result<Self> {
        let mut engine = Engine::new();
        engine.set_max_call_levels(options.max_call_depth);
        engine.set_max_operations(options.max_operations);
        engine.set_max_expr_depths(128, 64);

        let interrupt = Arc::new(AtomicBool::new(false));
        let flag = interrupt.clone();
        // When the script itself first sees the flag (milliseconds since `seen_from`, plus 1;
        // 0: not yet). It stops at its next interruption point, or after INTERRUPT_GRACE of
        // script code.
        let seen_from = Instant::now();
        let seen = Arc::new(AtomicU64::new(0));
        engine.on_progress(move |_| {
            if !flag.load(Ordering::Relaxed) {
                seen.store(0, Ordering::Relaxed);
                return None;
            }
            let now = seen_from.elapsed().as_millis() as u64 + 1;
            let first = match seen.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => now,
                Err(first) => first,
            };
            (now - first >= INTERRUPT_GRACE.as_millis() as u64)
                .then(|| Dynamic::from("interrupted"))
        });

        let mut config = Map::new();
        for (key, value) in &options.config {
            config.insert(key.as_str().into(), parse_config_value(value));
        }
        let mut scope = Scope::new();
        scope.push_constant("config", config);

        let ctx = Rc::new(HostContext {
            rng: RefCell::new(StdRng::seed_from_u64(options.seed)),
            options,
            interrupt,
            progress: RefCell::new(Box::new(NoProgress)),
            interrupt_hooks: RefCell::new(Vec::new()),
            last_checkpoint: RefCell::new(None),
            started: Instant::now(),
            next_progress_id: RefCell::new(0),
        });

        let mut api = Api::new(&mut engine);
        super::api::register_all(&mut api, &ctx);
        let registry = api.finish();

        Ok(Self {
            engine,
            registry,
            ctx,
            scope,
            lib: AST::empty(),
        })
    }

    /// The documentation of every registered function.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The rhai engine, e.g. to set `on_print`.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// The rhai engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The variables kept between evaluations.
    pub fn scope(&self) -> &Scope<'static> {
        &self.scope
    }

    /// The shared host state.
    pub fn context(&self) -> &Rc<HostContext> {
        &self.ctx
    }

    /// The flag a Ctrl-C handler sets to stop the running evaluation between statements.
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        self.ctx.interrupt.clone()
    }

    /// Whether the last evaluation was stopped by the interrupt flag.
    pub fn interrupted(&self) -> bool {
        self.ctx.interrupt.load(Ordering::Relaxed)
    }

    /// Clears the interrupt flag, so the session can continue.
    pub fn clear_interrupt(&self) {
        self.ctx.interrupt.store(false, Ordering::Relaxed);
    }

    /// Sends progress of `progress(...)` bars to `sink`.
    pub fn set_progress_sink(&self, sink: Box<dyn ProgressSink>) {
        *self.ctx.progress.borrow_mut() = sink;
    }

    /// Compiles a script, keeping its functions for later calls.
    pub fn compile(&self, source: &str) -> std::result::Result<AST, Box<EvalAltResult>> {
        self.engine
            .compile_with_scope(&self.scope, source)
            .map_err(Into::into)
    }

    /// Runs a compiled script in the session scope, returning the value of its last statement.
    pub fn run_ast(&mut self, ast: &AST) -> std::result::Result<Dynamic, Box<EvalAltResult>> {
        self.engine
            .eval_ast_with_scope(&mut self.scope, ast)
            .map_err(|err| self.suggest(*err))
    }

    /// A call of an unknown function that is a letter or two from a documented one gets
    /// "did you mean" added (`lod_model` -> `load_model`).
    fn suggest(&self, err: EvalAltResult) -> Box<EvalAltResult> {
        match err {
            EvalAltResult::ErrorFunctionNotFound(signature, position) => {
                let name = name_of_signature(&signature);
                let signature = match self.registry.closest(&name) {
                    Some(near) => format!("{signature}; did you mean `{near}`?"),
                    None => signature,
                };
                Box::new(EvalAltResult::ErrorFunctionNotFound(signature, position))
            }
            other => Box::new(other),
        }
    }

    /// Compiles and runs `source` in the session scope.
    pub fn eval(&mut self, source: &str) -> std::result::Result<Dynamic, Box<EvalAltResult>> {
        let ast = self.compile(source)?;
        self.run_ast(&ast)
    }

    /// Compiles and runs `source` in the session scope, discarding its value.
    pub fn run(&mut self, source: &str) -> std::result::Result<(), Box<EvalAltResult>> {
        self.eval(source).map(|_| ())
    }

    /// Evaluates one REPL input (or a `:load`ed file): variables stay in the scope and the
    /// functions it defines stay callable by later inputs.
    pub fn eval_session(
        &mut self,
        source: &str,
    ) -> std::result::Result<Dynamic, Box<EvalAltResult>> {
        let ast = self.compile(source)?;
        let merged = self.lib.merge(&ast);
        self.lib = self.lib.merge(&ast.clone_functions_only());
        self.run_ast(&merged)
    }

    /// The functions defined so far in the session, for running `on_interrupt` hooks.
    pub fn session_lib(&self) -> &AST {
        &self.lib
    }

    /// What tab completion offers now: documented functions, rhai keywords, methods and
    /// properties (after a `.`), and the session's variables and functions.
    pub fn completions(&self) -> Completions {
        let mut names = Completions::default();
        for doc in self.registry.entries() {
            let is_method = doc.signature.contains(&format!(".{}", doc.name));
            if is_method {
                names.methods.insert(doc.name.to_string());
            } else if doc.name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                names.functions.insert(doc.name.to_string());
            }
        }
        for keyword in KEYWORDS {
            names.functions.insert(keyword.to_string());
        }
        for f in self.lib.iter_functions() {
            names.functions.insert(f.name.to_string());
        }
        for (name, _, _) in self.scope.iter_raw() {
            names.variables.insert(name.to_string());
        }
        names
    }

    /// Calls the closures scripts registered with `on_interrupt`, after clearing the flag so
    /// that they can run; returns how many ran.
    pub fn run_interrupt_hooks(
        &mut self,
        ast: &AST,
    ) -> std::result::Result<usize, Box<EvalAltResult>> {
        self.clear_interrupt();
        let hooks: Vec<FnPtr> = self.ctx.interrupt_hooks.borrow().clone();
        for hook in &hooks {
            let _ = hook.call::<Dynamic>(&self.engine, ast, ())?;
        }
        Ok(hooks.len())
    }
}

/// rhai keywords and built-ins offered by completion.
const KEYWORDS: [&str; 22] = [
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "do", "until", "break",
    "continue", "return", "throw", "try", "catch", "switch", "print", "debug", "type_of", "help",
];

/// Turns a library error into a script error; the engine adds the call's position.
pub fn script_err(err: impl std::fmt::Display) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(without_backtrace(&err.to_string())),
        Position::NONE,
    ))
}

/// candle appends a captured backtrace to its messages when `RUST_BACKTRACE` is set; a script
/// user needs the message only.
fn without_backtrace(message: &str) -> String {
    match message.find("\n   0: ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Formats a script error for a person: `file:line:column: message`, the source line and a
/// caret under the column. Errors without a position give the message alone.
pub fn render_error(err: &EvalAltResult, file: &str, source: &str) -> String {
    let pos = innermost_position(err);
    let message = err.to_string();
    let (Some(line), Some(column)) = (pos.line(), pos.position()) else {
        return format!("{file}: error: {message}");
    };

    // rhai appends positions in words; ours is already at the front.
    let message = strip_word_positions(&message);

    let text = source.lines().nth(line - 1).unwrap_or("");
    let gutter = format!("{line} | ");
    format!(
        "{file}:{line}:{column}: error: {message}\n{gutter}{text}\n{}^",
        " ".repeat(gutter.len() + column.saturating_sub(1))
    )
}

/// Removes every ` (line N, position M)` rhai writes into its messages.
fn strip_word_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" (line ") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match tail.find(')') {
            Some(end) if tail[..end].contains(", position ") => rest = &tail[end + 1..],
            _ => {
                out.push_str(" (line ");
                rest = &tail[" (line ".len()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The position an error points at: for an error raised inside a script function, the
/// deepest one (where it actually went wrong).
fn innermost_position(err: &EvalAltResult) -> Position {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, pos) => {
            let p = innermost_position(inner);
            if p.is_none() {
                *pos
            } else {
                p
            }
        }
        other => other.position(),
    }
}
