//! `ganpo-run`: runs a rhai experiment script (or `-e CODE`) with the GANPO API.
//!
//! Exit codes: 0 success, 1 script error (file:line:column, source line and caret on stderr),
//! 2 bad command line, 130 interrupted by Ctrl-C (after the script's `on_interrupt` hooks ran,
//! e.g. to write a checkpoint).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context};
use clap::Parser;
use ganpo::script::{render_error, Host, HostOptions};

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
    ganpo::model::alloc::keep_freed_memory();
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
        .on_print(move |s| multi.suspend(|| println!("{s}")));
    host.engine_mut().on_debug(|s, src, pos| {
        eprintln!(
            "[debug {}{pos}] {s}",
            src.map(|s| format!("{s}:")).unwrap_or_default()
        )
    });
    host.set_progress_sink(Box::new(progress));

    let flag = host.interrupt_flag();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C while the first is being honoured: leave at once.
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;

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
            Ok(ExitCode::from(130))
        }
        Err(err) => {
            eprintln!("{}", render_error(&err, &name, &source));
            Ok(ExitCode::from(1))
        }
    }
}
