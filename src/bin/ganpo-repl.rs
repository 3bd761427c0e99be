//! `ganpo-repl`: the interactive GANPO session (rhai with the whole API).
//!
//! Persistent history ($GANPO_HISTORY or ~/.ganpo_history), multi-line input (an unfinished
//! block continues on the next line), tab completion of functions, variables and methods,
//! `help` / `help NAME`, `:load FILE`, `:vars`, `:quit`. Variables and functions live on
//! between inputs. Ctrl-C at the prompt clears the line; during an evaluation it stops the
//! evaluation between statements and keeps the session.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::Parser;
use ganpo::script::repl::{complete, is_incomplete, Completions};
use ganpo::script::{render_error, Host, HostOptions, TensorHandle};
use rhai::{Dynamic, Engine};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper, Highlighter, Hinter};

/// The interactive GANPO session.
#[derive(Parser, Debug)]
#[command(name = "ganpo-repl", version)]
struct Args {
    /// A value for scripts: `config.KEY` and `cfg("KEY", default)` see it (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,

    /// Output folder: relative paths written by the session land here.
    #[arg(long, default_value = "out")]
    out: PathBuf,

    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Seed of the host's random generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Let the session write files outside --out.
    #[arg(long)]
    allow_write_anywhere: bool,
}

/// Completion and multi-line validation for rustyline.
#[derive(Helper, Highlighter, Hinter)]
struct ReplHelper {
    names: Rc<RefCell<Completions>>,
    parser: Engine,
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, found) = complete(line, pos, &self.names.borrow());
        let pairs = found
            .into_iter()
            .map(|name| Pair {
                display: name.clone(),
                replacement: name,
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        let input = ctx.input();
        let command = input.trim_start().starts_with(':') || input.trim_start().starts_with("help");
        if !command && is_incomplete(&self.parser, input) {
            return Ok(ValidationResult::Incomplete);
        }
        Ok(ValidationResult::Valid(None))
    }
}

fn history_path() -> PathBuf {
    if let Some(path) = std::env::var_os("GANPO_HISTORY") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".ganpo_history")
}

fn show(value: &Dynamic) -> Option<String> {
    if value.is_unit() {
        return None;
    }
    if let Some(t) = value.clone().try_cast::<TensorHandle>() {
        return Some(format!("{}", t.0));
    }
    if value.is_string() {
        return Some(format!("{value:?}"));
    }
    Some(value.to_string())
}

fn main() -> anyhow::Result<()> {
    ganpo::model::process::setup();
    let args = Args::parse();
    let mut config = BTreeMap::new();
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--set expects KEY=VALUE, got `{pair}`"))?;
        config.insert(key.trim().to_string(), value.to_string());
    }
    let options = HostOptions {
        out_dir: args.out.clone(),
        allow_write_anywhere: args.allow_write_anywhere,
        device: common::parse_device(&args.device)?,
        seed: args.seed,
        config,
        ..Default::default()
    };
    let mut host = Host::new(options)?;

    let progress = common::TerminalProgress::new();
    let multi = progress.multi();
    host.engine_mut()
        .on_print(move |s| multi.suspend(|| println!("{s}")));
    host.set_progress_sink(Box::new(progress));

    let flag = host.interrupt_flag();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let names = Rc::new(RefCell::new(host.completions()));
    let mut editor: Editor<ReplHelper, _> = Editor::new()?;
    editor.set_helper(Some(ReplHelper {
        names: names.clone(),
        parser: Engine::new_raw(),
    }));
    let history = history_path();
    let _ = editor.load_history(&history);

    println!("ganpo-repl: rhai with the GANPO API. `help`, `help NAME`, `:load FILE`, `:quit`.");
    loop {
        let input = match editor.readline("ganpo> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                println!("(Ctrl-C: line cleared; Ctrl-D or :quit leaves)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(err) => return Err(err.into()),
        };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(input.as_str());
        let _ = editor.save_history(&history);

        let (name, source) = match trimmed {
            ":quit" | ":q" | "exit" => break,
            "help" => {
                print!("{}", host.registry().help());
                continue;
            }
            ":vars" => {
                for (var, _, value) in host.scope().iter_raw() {
                    println!("{var}: {}", value.type_name());
                }
                continue;
            }
            _ if trimmed.starts_with("help ") => {
                let topic = trimmed["help ".len()..].trim();
                match host.registry().help_for(topic) {
                    Some(text) => print!("{text}"),
                    None => match host.registry().closest(topic) {
                        Some(near) => println!("no function `{topic}`; did you mean `{near}`?"),
                        None => println!("no function `{topic}`; `help` lists them all"),
                    },
                }
                continue;
            }
            _ if trimmed.starts_with(':')
                && !trimmed.starts_with(":load ")
                && !matches!(trimmed, ":quit" | ":q" | ":vars") =>
            {
                println!(
                    "unknown command `{trimmed}`; commands: :load FILE, :vars, :quit \
                     (`help` lists the functions)"
                );
                continue;
            }
            _ if trimmed.starts_with(":load ") => {
                let file = trimmed[":load ".len()..].trim().to_string();
                match std::fs::read_to_string(&file) {
                    Ok(source) => (file, source),
                    Err(err) => {
                        println!("{file}: {err}");
                        continue;
                    }
                }
            }
            _ => ("<input>".to_string(), input.clone()),
        };

        match host.eval_session(&source) {
            Ok(value) => {
                if let Some(text) = show(&value) {
                    println!("{text}");
                }
            }
            Err(_) if host.interrupted() => {
                host.clear_interrupt();
                println!("interrupted (session kept)");
            }
            Err(err) => eprintln!("{}", render_error(&err, &name, &source)),
        }
        *names.borrow_mut() = host.completions();
    }
    Ok(())
}
