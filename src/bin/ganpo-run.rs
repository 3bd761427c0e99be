//! `ganpo-run`: runs a rhai experiment script (or `-e CODE`) with the GANPO API.
//!
//! Exit codes: 0 success, 1 script error (file:line:column, source line and caret on stderr),
//! 2 bad command line, 130 interrupted by Ctrl-C (after the script's `on_interrupt` hooks ran,
//! e.g. to write a checkpoint).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context};
use clap::Parser;
use ganpo::script::{closest_name, render_error, Host, HostOptions};

/// Run a GANPO experiment script.
#[derive(Parser, Debug)]
#[command(name = "ganpo-run", version)]
struct Args {
    /// The rhai script to run.
    file: Option<PathBuf>,

    /// Run this code instead of a file.
    #[arg(
        short = 'e',
        long = "eval",
        value_name = "CODE",
        conflicts_with = "file"
    )]
    code: Option<String>,

    /// A value for the script: `config.KEY` and `cfg("KEY", default)` see it (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,

    /// Output folder: relative paths written by the script land here.
    #[arg(long, default_value = "out")]
    out: PathBuf,

    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Seed of the host's random generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Most script operations allowed (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_operations: u64,

    /// Deepest function-call nesting allowed.
    #[arg(long, default_value_t = 64)]
    max_call_depth: usize,

    /// Let the script write files outside --out.
    #[arg(long)]
    allow_write_anywhere: bool,

    /// Print the script reference (Markdown, for the README) and exit.
    #[arg(long)]
    help_markdown: bool,
}

fn parse_set(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut config = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--set expects KEY=VALUE, got `{pair}`");
        };
        config.insert(key.trim().to_string(), value.to_string());
    }
    Ok(config)
}

fn build_host(args: &Args) -> anyhow::Result<Host> {
    let options = HostOptions {
        out_dir: args.out.clone(),
        allow_write_anywhere: args.allow_write_anywhere,
        max_operations: args.max_operations,
        max_call_depth: args.max_call_depth,
        device: common::parse_device(&args.device)?,
        seed: args.seed,
        config: parse_set(&args.set)?,
    };
    Ok(Host::new(options)?)
}

fn main() -> ExitCode {
    ganpo::model::process::setup();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ganpo-run: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut host = build_host(args)?;
    if args.help_markdown {
        print!("{}", host.registry().markdown());
        return Ok(ExitCode::SUCCESS);
    }
    let (name, source) = match (&args.code, &args.file) {
        (Some(code), _) => ("<-e>".to_string(), code.clone()),
        (None, Some(file)) => {
            let source = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            (file.display().to_string(), source)
        }
        (None, None) => bail!("give a script FILE or -e CODE (see --help)"),
    };

    let progress = common::TerminalProgress::new();
    let multi = progress.multi();
    host.engine_mut()
        // A closed stdout (a `| head` that has read enough, a `tee` that died) must not end a
        // training run: what cannot be printed is dropped.
        .on_print(move |s| {
            multi.suspend(|| {
                let _ = writeln!(std::io::stdout(), "{s}");
            })
        });
    host.engine_mut().on_debug(|s, src, pos| {
        eprintln!(
            "[debug {}{pos}] {s}",
            src.map(|s| format!("{s}:")).unwrap_or_default()
        )
    });
    host.set_progress_sink(Box::new(progress));

    let flag = host.interrupt_flag();
    let presses = AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) > 0 {
            // A second Ctrl-C while the first is being honoured (the hooks clear the flag to
            // run, so it is counted here): leave at once.
            std::process::exit(130);
        }
        flag.store(true, Ordering::SeqCst);
        eprintln!(
            "ganpo-run: Ctrl-C: the running training step or evaluation finishes, the script \
             stops before the next one, then its on_interrupt hooks run; press again to quit \
             at once"
        );
    })
    .context("installing the Ctrl-C handler")?;

    // A key one or two letters from one the script reads is a typo that would otherwise be
    // ignored for a whole training run: refuse to start. Other unread keys (settings shared
    // by several scripts) are only reported.
    let unread = unread_settings(&source, &args_config(args));
    for (problem, typo) in &unread {
        let kind = if *typo { "error" } else { "warning" };
        eprintln!("ganpo-run: {kind}: {problem}");
    }
    if unread.iter().any(|(_, typo)| *typo) {
        return Ok(ExitCode::from(2));
    }

    let ast = match host.compile(&source) {
        Ok(ast) => ast,
        Err(err) => {
            eprintln!("{}", render_error(&err, &name, &source));
            return Ok(ExitCode::from(1));
        }
    };
    match host.run_ast(&ast) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(_) if host.interrupted() => {
            eprintln!("ganpo-run: interrupted; running on_interrupt hooks");
            if let Err(err) = host.run_interrupt_hooks(&ast) {
                eprintln!("{}", render_error(&err, &name, &source));
            }
            let checkpoint = host.context().last_checkpoint.borrow().clone();
            match checkpoint {
                Some(dir) if reads_setting(&source, "resume") => eprintln!(
                    "ganpo-run: newest checkpoint {}; the same command with --set resume=true \
                     continues from it",
                    dir.display()
                ),
                Some(dir) => eprintln!("ganpo-run: newest checkpoint {}", dir.display()),
                None => eprintln!("ganpo-run: no checkpoint was written"),
            }
            Ok(ExitCode::from(130))
        }
        Err(err) => {
            eprintln!("{}", render_error(&err, &name, &source));
            Ok(ExitCode::from(1))
        }
    }
}

/// The `--set` keys as given.
fn args_config(args: &Args) -> Vec<String> {
    args.set
        .iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect()
}

/// A complaint for each `--set` key the script never reads, found before it runs, and whether
/// it looks like a typo of a key the script reads (a misspelled key would otherwise be ignored
/// silently for a whole training run).
///
/// The keys a script reads are the string literals of its `cfg("key", ...)` calls; a script
/// that computes a key or reads the `config` map directly can read anything, and gets none.
fn unread_settings(source: &str, set: &[String]) -> Vec<(String, bool)> {
    let Some(read) = settings_read(source) else {
        return Vec::new();
    };
    let mentions_config = source.match_indices("config").any(|(at, word)| {
        let before = source[..at].chars().next_back();
        let after = source[at + word.len()..].chars().next();
        let is_name = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !is_name(before) && !is_name(after)
    });
    if mentions_config {
        return Vec::new();
    }
    set.iter()
        .filter(|key| !read.contains(key))
        .map(
            |key| match closest_name(key, read.iter().map(String::as_str)) {
                Some(r) => (
                    format!("--set {key}: the script never reads it; did you mean {r}?"),
                    true,
                ),
                None => (
                    format!(
                        "--set {key}: the script never reads it (it reads: {})",
                        if read.is_empty() {
                            "nothing".to_string()
                        } else {
                            read.join(", ")
                        }
                    ),
                    false,
                ),
            },
        )
        .collect()
}

/// Whether the script reads the setting `key` (`cfg("key", ...)` or `config.key`).
fn reads_setting(source: &str, key: &str) -> bool {
    settings_read(source).is_some_and(|read| read.iter().any(|r| r == key))
        || source.contains(&format!("config.{key}"))
}

/// The keys a script reads with `cfg("KEY", default)`, in order; `None` when a `cfg(` call
/// names its key other than by a string literal.
fn settings_read(source: &str) -> Option<Vec<String>> {
    let mut read = Vec::new();
    for (at, _) in source.match_indices("cfg(") {
        let preceded_by_name = source[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_name {
            continue;
        }
        let rest = source[at + 4..].trim_start();
        match rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
            Some((key, _)) if !read.iter().any(|r| r == key) => read.push(key.to_string()),
            Some(_) => {}
            None => return None,
        }
    }
    Some(read)
}
