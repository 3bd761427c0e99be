//! The REPL's input logic without a terminal: which inputs continue on the next line, and what
//! Tab offers where.

use ganpo::script::repl::{complete, is_incomplete, Completions};
use ganpo::script::{Host, HostOptions};

#[test]
fn open_blocks_arrays_maps_calls_and_backtick_strings_continue() {
    let engine = rhai::Engine::new_raw();

    for open in [
        "fn f() {",
        "if true {",
        "let x = [1,",
        "let m = #{a: 1,",
        "foo(1, ",
        "let s = `abc",
        "let y = 1 +",
    ] {
        assert!(is_incomplete(&engine, open), "`{open}` should continue");
    }
    for done in [
        "let x = 1;",
        "fn f() { 1 }",
        "x + 2",
        "let x = ;",
        "let s = \"abc",
        "}",
    ] {
        assert!(
            !is_incomplete(&engine, done),
            "`{done}` is complete or a real error"
        );
    }
}

#[test]
fn completion_offers_methods_after_a_dot_and_names_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = Host::new(HostOptions {
        out_dir: dir.path().into(),
        ..Default::default()
    })
    .unwrap();
    host.run("let policy_lr = 1.0;").unwrap();
    let names: Completions = host.completions();

    let (start, found) = complete("let y = tens", 12, &names);
    assert_eq!((start, found), (8, vec!["tensor".to_string()]));
    let (_, methods) = complete("t.it", 4, &names);
    assert_eq!(methods, ["item"]);
    let (_, vars) = complete("print(policy_", 13, &names);
    assert_eq!(vars, ["policy_lr"]);
    let (_, fns) = complete("load_", 5, &names);
    assert!(
        fns.contains(&"load_model".to_string()) && fns.contains(&"load_preferences".to_string())
    );
}
