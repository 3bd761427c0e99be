//! `ganpo-repl` driven through a pseudo-terminal, as a person types: variables persist,
//! unfinished blocks continue, Tab completes, Ctrl-C stops an evaluation, history persists.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rexpect::session::{spawn_command, PtySession};

const PROMPT: &str = "ganpo> ";

fn start(dir: &Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ganpo-repl"));
    cmd.env("GANPO_HISTORY", dir.join("history.txt"))
        .env("TERM", "xterm")
        .args(["--out", dir.join("out").to_str().unwrap()]);
    let mut repl = spawn_command(cmd, Some(20_000)).expect("ganpo-repl starts in a pty");
    repl.exp_string(PROMPT).expect("first prompt");
    repl
}

#[test]
fn variables_and_functions_persist_and_blocks_continue_over_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut repl = start(dir.path());

    repl.send_line("let x = 40;").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("fn twice(a) {").unwrap();
    repl.send_line("  a * 2").unwrap();
    repl.send_line("}").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("twice(x) + 3").unwrap();

    repl.exp_string("83").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line(":quit").unwrap();
    repl.exp_eof().unwrap();
}

#[test]
fn tab_completes_functions_and_methods() {
    let dir = tempfile::tempdir().unwrap();
    let mut repl = start(dir.path());

    // "tens" completes to the function `tensor`, ".ite" to the method `item`.
    repl.send("tens\t").unwrap();
    repl.send("([2.5]).ite\t").unwrap();
    repl.send_line("() * 3.0").unwrap();

    repl.exp_string("7.5").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line(":quit").unwrap();
    repl.exp_eof().unwrap();
}

#[test]
fn help_lists_functions_explains_one_and_answers_typos() {
    let dir = tempfile::tempdir().unwrap();
    let mut repl = start(dir.path());

    repl.send_line("help").unwrap();
    repl.exp_string("[tensor]").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("help item").unwrap();
    repl.exp_string("The value of a one-element tensor.")
        .unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("help lod_model").unwrap();
    repl.exp_string("did you mean `load_model`?").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line(":foo").unwrap();
    repl.exp_string("unknown command `:foo`").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line(":quit").unwrap();
    repl.exp_eof().unwrap();
}

#[test]
fn ctrl_c_interrupts_a_running_evaluation_and_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut repl = start(dir.path());

    repl.send_line("let kept = 5; let i = 0; loop { i += 1; }")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    repl.send_control('c').unwrap();

    repl.exp_string("interrupted (session kept)").unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("kept * 11").unwrap();
    repl.exp_string("55").unwrap();
    repl.send_line(":quit").unwrap();
    repl.exp_eof().unwrap();
}

#[test]
fn history_survives_a_restart_and_up_arrow_recalls_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start(dir.path());
    first.send_line("print(`recalled ${6 * 7}`);").unwrap();
    first.exp_string("recalled 42").unwrap();
    first.exp_string(PROMPT).unwrap();
    first.send_line(":quit").unwrap();
    first.exp_eof().unwrap();

    let saved = std::fs::read_to_string(dir.path().join("history.txt")).unwrap();
    assert!(saved.contains("print(`recalled ${6 * 7}`);"), "{saved}");
    let mut second = start(dir.path());
    // Up arrow twice (past `:quit`), then Enter.
    for key in ["\x1b[A", "\x1b[A", "\r"] {
        second.send(key).unwrap();
        second.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    second.exp_string("recalled 42").unwrap();
    second.send_line(":quit").unwrap();
    second.exp_eof().unwrap();
}

#[test]
fn load_runs_a_file_into_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lib.rhai");
    std::fs::write(&file, "fn triple(a) { a * 3 }\nlet loaded = 14;\n").unwrap();
    let mut repl = start(dir.path());

    repl.send_line(&format!(":load {}", file.display()))
        .unwrap();
    repl.exp_string(PROMPT).unwrap();
    repl.send_line("triple(loaded)").unwrap();

    repl.exp_string("42").unwrap();
    repl.send_line(":quit").unwrap();
    repl.exp_eof().unwrap();
}
