//! Script functions about the run itself: configuration, output paths, files, progress,
//! interruption and timing.

use std::rc::Rc;

use rhai::{Dynamic, EvalAltResult, FnPtr};

use crate::script::engine::{parse_config_value, script_err, HostContext};
use crate::script::registry::Api;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// A progress bar handle; the host's progress sink draws it (or not).
#[derive(Clone)]
pub struct ProgressHandle {
    ctx: Rc<HostContext>,
    id: u64,
}

/// Converts a `--set` value to the type of the script's default, so that
/// `cfg("lr", 1e-6)` is always a float and `cfg("steps", 10)` always an int.
fn coerce_like(raw: &str, default: &Dynamic) -> RResult<Dynamic> {
    let bad = |what: &str| script_err(format!("--set value `{raw}` is not {what}"));
    if default.is_int() {
        return raw
            .parse::<i64>()
            .map(Dynamic::from_int)
            .map_err(|_| bad("an integer"));
    }
    if default.is_float() {
        return raw
            .parse::<f64>()
            .map(Dynamic::from_float)
            .map_err(|_| bad("a number"));
    }
    if default.is_bool() {
        return raw
            .parse::<bool>()
            .map(Dynamic::from_bool)
            .map_err(|_| bad("true or false"));
    }
    if default.is_string() {
        return Ok(Dynamic::from(raw.to_string()));
    }
    Ok(parse_config_value(raw))
}

/// Registers the run-level functions.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.category("run");

    let c = ctx.clone();
    api.func(
        "cfg",
        "cfg(key, default) -> value",
        "The --set value of key converted to the default's type, or the default when unset.",
        "let steps = cfg(\"max_steps\", 100);\nlet model = cfg(\"model\", \"assets/model.gguf\");",
        move |key: &str, default: Dynamic| -> RResult<Dynamic> {
            match c.options.config.get(key) {
                Some(raw) => coerce_like(raw, &default),
                None => Ok(default),
            }
        },
    );
    api.doc(
        "config",
        "config -> map",
        "Constant map of every --set key=value (ints, floats and bools parsed).",
        "if \"lr\" in config { print(config.lr); }",
    );

    let c = ctx.clone();
    api.func(
        "out_path",
        "out_path(name) -> string",
        "Where a relative name lands under --out (refused outside it unless allowed).",
        "let png = out_path(\"loss.png\");",
        move |name: &str| -> RResult<String> {
            let p = c.writable(name).map_err(script_err)?;
            Ok(p.display().to_string())
        },
    );
    let c = ctx.clone();
    api.func(
        "out_dir",
        "out_dir() -> string",
        "The output folder given by --out.",
        "print(out_dir());",
        move || c.options.out_dir.display().to_string(),
    );
    let c = ctx.clone();
    api.func(
        "write_text",
        "write_text(path, text)",
        "Writes a text file under --out (folders created).",
        "write_text(\"notes.txt\", `loss ${loss}`);",
        move |path: &str, text: &str| -> RResult<()> {
            let p = c.writable(path).map_err(script_err)?;
            write_file(&p, text.as_bytes())
        },
    );
    let c = ctx.clone();
    api.func(
        "write_json",
        "write_json(path, value)",
        "Writes any value as pretty JSON under --out.",
        "write_json(\"summary.json\", #{accuracy: 0.7});",
        move |path: &str, value: Dynamic| -> RResult<()> {
            let p = c.writable(path).map_err(script_err)?;
            let json = serde_json::to_string_pretty(&value).map_err(script_err)?;
            write_file(&p, json.as_bytes())
        },
    );
    api.func(
        "read_text",
        "read_text(path) -> string",
        "Reads a whole text file.",
        "let prompts = read_text(\"prompts.txt\").split(\"\\n\");",
        |path: &str| -> RResult<String> {
            std::fs::read_to_string(path).map_err(|e| script_err(format!("{path}: {e}")))
        },
    );
    api.func(
        "read_json",
        "read_json(path) -> value",
        "Reads a JSON file into maps, arrays and numbers.",
        "let rows = read_json(\"assets/alpaca_eval/outputs.json\");",
        |path: &str| -> RResult<Dynamic> {
            let text =
                std::fs::read_to_string(path).map_err(|e| script_err(format!("{path}: {e}")))?;
            serde_json::from_str::<Dynamic>(&text).map_err(|e| script_err(format!("{path}: {e}")))
        },
    );

    api.engine()
        .register_type_with_name::<ProgressHandle>("Progress");
    let c = ctx.clone();
    api.func(
        "progress",
        "progress(total, label) -> Progress",
        "Starts a progress bar (drawn by ganpo-run with rate and ETA on a terminal).",
        "let bar = progress(100, \"train\");\nfor i in 0..100 { bar.tick(); }\nbar.finish();",
        move |total: i64, label: &str| {
            let id = c.progress_id();
            c.progress.borrow().start(id, total.max(0) as u64, label);
            ProgressHandle { ctx: c.clone(), id }
        },
    );
    api.func(
        "tick",
        "bar.tick(); bar.tick(message)",
        "Advances a progress bar by one step, optionally with a status message.",
        "bar.tick(`loss ${loss}`);",
        |bar: &mut ProgressHandle| bar.ctx.progress.borrow().advance(bar.id, 1, ""),
    );
    api.overload("tick", |bar: &mut ProgressHandle, msg: &str| {
        bar.ctx.progress.borrow().advance(bar.id, 1, msg)
    });
    api.func(
        "finish",
        "bar.finish()",
        "Ends a progress bar.",
        "bar.finish();",
        |bar: &mut ProgressHandle| bar.ctx.progress.borrow().finish(bar.id),
    );

    let c = ctx.clone();
    api.func(
        "on_interrupt",
        "on_interrupt(closure)",
        "Runs closure after Ctrl-C stopped the script (e.g. to write a checkpoint).",
        "on_interrupt(|| trainer.save_checkpoint(\"ckpt\"));",
        move |f: FnPtr| c.interrupt_hooks.borrow_mut().push(f),
    );
    let c = ctx.clone();
    api.func(
        "elapsed",
        "elapsed() -> f64",
        "Seconds since the host started.",
        "print(`took ${elapsed()} s`);",
        move || c.started.elapsed().as_secs_f64(),
    );
    let c = ctx.clone();
    api.func(
        "seed",
        "seed() -> int",
        "The run's seed (--seed).",
        "print(seed());",
        move || c.options.seed as i64,
    );
    let c = ctx.clone();
    api.func(
        "device",
        "device() -> string",
        "The run's device (--device).",
        "print(device());",
        move || format!("{:?}", c.options.device),
    );
    api.func(
        "fail",
        "fail(message)",
        "Stops the script with an error (exit code 1 in ganpo-run).",
        "if acc < 0.5 { fail(\"no learning\"); }",
        |msg: &str| -> RResult<()> { Err(script_err(msg)) },
    );
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> RResult<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| script_err(format!("{}: {e}", dir.display())))?;
    }
    std::fs::write(path, bytes).map_err(|e| script_err(format!("{}: {e}", path.display())))
}
