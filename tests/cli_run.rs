//! `ganpo-run` as a user meets it: exit codes, error carets on stderr, --set, --out, Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

fn ganpo_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ganpo-run"))
        .args(args)
        .output()
        .expect("ganpo-run starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts ganpo-run with `args` and waits for the first line it prints; returns the child,
/// whose stdout is closed after that line, and the line.
fn start_until_first_line(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ganpo-run"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (child, first.trim().to_string())
}

#[test]
fn a_successful_script_exits_zero_and_prints_to_stdout() {
    let out = ganpo_run(&["-e", "print((tensor([1.0, 2.0]) * 3.0).sum().item());"]);

    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "9.0");
}

#[test]
fn a_runtime_error_exits_one_with_file_line_column_source_and_caret_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("broken.rhai");
    std::fs::write(
        &script,
        "let a = tensor([1.0, 2.0]);\nprint(\"before\");\nlet b = a.reshape([3]);\n",
    )
    .unwrap();

    let out = ganpo_run(&[script.to_str().unwrap()]);

    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("broken.rhai:3:11: error:"), "{stderr}");
    assert!(stderr.contains("3 | let b = a.reshape([3]);"), "{stderr}");
    let caret_line = stderr
        .lines()
        .find(|l| l.trim() == "^")
        .expect("a caret line");
    let source_line = stderr.lines().find(|l| l.starts_with("3 | ")).unwrap();
    assert_eq!(
        caret_line.find('^'),
        source_line.find("reshape"),
        "{stderr}"
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "before",
        "the error goes to stderr only"
    );
}

#[test]
fn a_syntax_error_exits_one_and_points_at_the_token() {
    let out = ganpo_run(&["-e", "let x = ;"]);

    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("<-e>:1:9: error: Syntax error"),
        "{stderr}"
    );
    assert!(stderr.contains("        ^"), "{stderr}");
}

#[test]
fn set_values_are_visible_through_config_and_cfg() {
    let out = ganpo_run(&[
        "--set",
        "steps=5",
        "--set",
        "tag=run a",
        "-e",
        "print(cfg(\"steps\", 1) * 2); print(config.tag);",
    ]);

    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "10\nrun a\n");
}

#[test]
fn outputs_are_written_under_out_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let code = "write_json(\"summary.json\", #{acc: 0.75});\n\
                plot_histogram(\"margins.png\", \"m\", [1.0, 2.0, 2.5, -1.0], #{});\n\
                write_text(\"../escape.txt\", \"x\");";

    let out = ganpo_run(&["--out", out_dir.to_str().unwrap(), "-e", code]);

    assert_eq!(
        out.status.code(),
        Some(1),
        "the escaping write fails the run"
    );
    let summary = std::fs::read_to_string(out_dir.join("summary.json")).unwrap();
    assert!(summary.contains("\"acc\": 0.75"), "{summary}");
    assert!(out_dir.join("margins.png").exists());
    assert!(!dir.path().join("escape.txt").exists());
    assert!(text(&out.stderr).contains("outside the output folder"));
}

#[test]
fn a_bad_command_line_exits_two() {
    assert_eq!(
        ganpo_run(&["--set", "novalue", "-e", "1"]).status.code(),
        Some(2)
    );
    assert_eq!(
        ganpo_run(&["--device", "tpu", "-e", "1"]).status.code(),
        Some(2)
    );
    assert_eq!(ganpo_run(&[]).status.code(), Some(2));
}

#[test]
fn operation_limit_flag_stops_an_endless_loop() {
    let out = ganpo_run(&["--max-operations", "5000", "-e", "loop { }"]);

    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("operations"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_markdown_prints_the_generated_reference() {
    let out = ganpo_run(&["--help-markdown"]);

    let md = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for section in ["### tensor", "### run", "### plot", "`t.item() -> f64`"] {
        assert!(md.contains(section), "missing {section}");
    }
}

#[test]
fn sigint_finishes_the_statement_runs_on_interrupt_hooks_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let code = "let step = 0;\n\
                on_interrupt(|| write_text(\"checkpoint.txt\", `step ${step}`));\n\
                print(\"ready\");\n\
                loop { step += 1; }";
    let (child, first) =
        start_until_first_line(&["--out", dir.path().to_str().unwrap(), "-e", code]);
    assert_eq!(first, "ready");

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();

    assert!(killed.success());
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted"));
    let saved = std::fs::read_to_string(dir.path().join("checkpoint.txt")).unwrap();
    assert!(saved.starts_with("step "), "{saved}");
}

#[test]
fn sigint_stops_the_script_at_its_next_batch_so_that_hooks_see_whole_steps() {
    // Each turn draws a batch (an interruption point), then does a stretch of script work
    // and counts the step. A Ctrl-C in the middle of a turn lets the turn finish and stops
    // the script when it asks for the next batch: the hook sees as many steps counted as
    // batches drawn, so a checkpoint written there is consistent.
    let dir = tempfile::tempdir().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/standard.jsonl");
    let code = "let m = random_model(#{family: \"llama\", seed: 1});\n\
                let pairs = load_preferences(config.data, m);\n\
                let s = pairs.sampler(pairs.split(0.0)[0], #{batch_size: 1});\n\
                let drawn = 0; let done = 0;\n\
                on_interrupt(|| write_text(\"state.txt\", `${drawn} ${done}`));\n\
                print(\"ready\");\n\
                loop {\n\
                    s.next(); drawn += 1;\n\
                    let x = 0; for i in 0..20000 { x += i; }\n\
                    done += 1;\n\
                }";
    let data = format!("data={data}");
    let out_dir = dir.path().to_str().unwrap();
    let (child, first) = start_until_first_line(&["--out", out_dir, "--set", &data, "-e", code]);
    assert_eq!(first, "ready");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();

    assert!(killed.success());
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let state = std::fs::read_to_string(dir.path().join("state.txt")).unwrap();
    let counts: Vec<u64> = state.split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(counts[0] > 0, "{state}");
    assert_eq!(
        counts[0], counts[1],
        "batches drawn vs steps counted: {state}"
    );
}

#[test]
fn a_closed_stdout_does_not_end_the_script() {
    // `ganpo-run ... | head -2`: once the reader has gone, prints are dropped and the script
    // runs to its end (a training run piped through a `tee` that dies must keep going).
    let dir = tempfile::tempdir().unwrap();
    let code = "for i in 0..20000 { print(i); }\nwrite_text(\"done.txt\", \"yes\");";
    let (child, first) =
        start_until_first_line(&["--out", dir.path().to_str().unwrap(), "-e", code]);
    assert_eq!(first, "0");
    let out = child.wait_with_output().unwrap();

    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    let done = std::fs::read_to_string(dir.path().join("done.txt")).unwrap();
    assert_eq!(done, "yes");
}

#[test]
fn a_misspelled_set_key_stops_the_script_before_it_runs_and_other_unread_keys_are_reported() {
    let script = "let steps = cfg(\"max_steps\", 3);\nprint(steps);";
    let out = ganpo_run(&["-e", script, "--set", "max_step=5", "--set", "zzz=1"]);

    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(text(&out.stdout).trim(), "", "the script must not run");
    assert!(
        stderr.contains("--set max_step: the script never reads it; did you mean max_steps?"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--set zzz: the script never reads it (it reads: max_steps)"),
        "{stderr}"
    );

    // A key far from every key read (a setting shared by several scripts) only warns.
    let shared = ganpo_run(&["-e", script, "--set", "zzz=1"]);
    assert_eq!(shared.status.code(), Some(0), "{}", text(&shared.stderr));
    assert_eq!(text(&shared.stdout).trim(), "3");
    assert!(text(&shared.stderr).contains("warning: --set zzz"));

    let read = ganpo_run(&["-e", script, "--set", "max_steps=5"]);
    assert!(
        !text(&read.stderr).contains("warning"),
        "{}",
        text(&read.stderr)
    );
    assert_eq!(text(&read.stdout).trim(), "5");

    // A script that reads the `config` map may read any key: no warning.
    let dynamic = ganpo_run(&["-e", "print(config.len());", "--set", "anything=1"]);
    assert!(
        !text(&dynamic.stderr).contains("warning"),
        "{}",
        text(&dynamic.stderr)
    );
}
