//! The scripting host: tensors, help coverage, limits, sandboxed writes and configuration.

use std::collections::BTreeMap;

use ganpo::script::registry::name_of_signature;
use ganpo::script::{Host, HostOptions};

fn host_with(out: &std::path::Path, config: &[(&str, &str)]) -> Host {
    let options = HostOptions {
        out_dir: out.to_path_buf(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    };
    Host::new(options).unwrap()
}

fn eval_f64(host: &mut Host, code: &str) -> f64 {
    host.eval(code)
        .unwrap_or_else(|e| panic!("{code}: {e}"))
        .as_float()
        .unwrap()
}

#[test]
fn help_documents_every_registered_function() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[]);
    let documented = host.registry().names();

    let undocumented: Vec<String> = host
        .engine()
        .gen_fn_signatures(false)
        .iter()
        .map(|s| name_of_signature(s))
        .filter(|name| !documented.contains(name.as_str()))
        .collect();

    assert!(
        undocumented.is_empty(),
        "registered without help: {undocumented:?}"
    );
    assert!(
        documented.len() > 60,
        "only {} documented names",
        documented.len()
    );
    assert!(host.registry().help().contains("tensor(array)"));
    assert!(host
        .registry()
        .help_for("item")
        .unwrap()
        .contains("example"));
    assert!(host.registry().help_for("no_such_function").is_none());
}

#[test]
fn every_help_example_at_least_parses() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(dir.path(), &[]);

    for doc in host.registry().entries() {
        if let Err(err) = host.engine().compile(doc.example) {
            panic!(
                "example of `{}` does not parse: {err}\n{}",
                doc.name, doc.example
            );
        }
    }
}

#[test]
fn tensor_arithmetic_and_reductions_match_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);
    host.run("let t = tensor([[1.0, 2.0], [3.0, 4.0]]);")
        .unwrap();

    // Expected values computed by hand from the 2×2 matrix above.
    assert_eq!(eval_f64(&mut host, "(t * 2.0 + 1).sum().item()"), 24.0);
    assert_eq!(eval_f64(&mut host, "(10.0 - t).mean().item()"), 7.5);
    assert_eq!(eval_f64(&mut host, "(t / t).sum().item()"), 4.0);
    assert_eq!(eval_f64(&mut host, "t.max().item()"), 4.0);
    assert_eq!(eval_f64(&mut host, "t.sum(0)[1].item()"), 6.0);
    assert_eq!(eval_f64(&mut host, "t.matmul(t)[0][1].item()"), 10.0);
    assert_eq!(eval_f64(&mut host, "t[-1].narrow(0, 1, 1).item()"), 4.0);
    assert_eq!(eval_f64(&mut host, "t.slice(1, -1, 2).sum().item()"), 6.0);
    assert!((eval_f64(&mut host, "tensor([0.0]).sigmoid().item()") - 0.5).abs() < 1e-7);
    assert!((eval_f64(&mut host, "tensor([0.0]).softplus().item()") - 2f64.ln()).abs() < 1e-6);
    assert!((eval_f64(&mut host, "t.softmax(-1).sum().item()") - 2.0).abs() < 1e-6);
}

#[test]
fn tensors_convert_to_and_from_arrays_keeping_shape_and_integer_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);

    let shape = host
        .eval("tensor([[1, 2, 3], [4, 5, 6]], \"u32\").shape")
        .unwrap();
    let back = host
        .eval("tensor([[1, 2, 3], [4, 5, 6]], \"u32\").to_array()")
        .unwrap();
    let floats = host.eval("tensor([0.5, 1.5]).to_array()").unwrap();

    assert_eq!(shape.to_string(), "[2, 3]");
    assert_eq!(back.to_string(), "[[1, 2, 3], [4, 5, 6]]");
    assert_eq!(floats.to_string(), "[0.5, 1.5]");
    let err = host.eval("tensor([[1.0, 2.0], [3.0]])").unwrap_err();
    assert!(err.to_string().contains("ragged"), "{err}");
}

#[test]
fn shape_errors_name_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);

    let err = host
        .eval("tensor([1.0, 2.0]) + tensor([1.0, 2.0, 3.0])")
        .unwrap_err();

    assert!(
        err.to_string().contains("[2]") && err.to_string().contains("[3]"),
        "{err}"
    );
}

#[test]
fn randn_is_reproducible_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let draw = |seed: u64| {
        let options = HostOptions {
            out_dir: dir.path().into(),
            seed,
            ..Default::default()
        };
        let mut host = Host::new(options).unwrap();
        host.eval("randn([4]).to_array()").unwrap().to_string()
    };

    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn set_values_reach_the_script_with_the_default_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(
        dir.path(),
        &[("steps", "12"), ("lr", "3"), ("name", "run-a")],
    );

    assert_eq!(
        host.eval("cfg(\"steps\", 5)").unwrap().as_int().unwrap(),
        12
    );
    assert_eq!(
        host.eval("cfg(\"lr\", 1e-6)").unwrap().as_float().unwrap(),
        3.0
    );
    assert_eq!(
        host.eval("cfg(\"missing\", 9)").unwrap().as_int().unwrap(),
        9
    );
    assert_eq!(
        host.eval("config.name").unwrap().into_string().unwrap(),
        "run-a"
    );
    assert!(
        host.eval("cfg(\"name\", 1)").is_err(),
        "a string where an int is expected"
    );
}

#[test]
fn writes_outside_the_output_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut host = host_with(&out, &[]);

    host.run("write_text(\"sub/ok.txt\", \"fine\")").unwrap();
    let outside = dir.path().join("escaped.txt");
    let escape = format!("write_text(\"{}\", \"no\")", outside.display());
    let err = host.eval(&escape).unwrap_err();
    let err_dots = host
        .eval("write_text(\"../escaped.txt\", \"no\")")
        .unwrap_err();

    assert_eq!(
        std::fs::read_to_string(out.join("sub/ok.txt")).unwrap(),
        "fine"
    );
    assert!(
        err.to_string().contains("outside the output folder"),
        "{err}"
    );
    assert!(
        err_dots.to_string().contains("outside the output folder"),
        "{err_dots}"
    );
    assert!(!outside.exists());
}

#[test]
fn operation_and_call_depth_limits_stop_runaway_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let options = HostOptions {
        out_dir: dir.path().into(),
        max_operations: 10_000,
        max_call_depth: 8,
        ..Default::default()
    };
    let mut host = Host::new(options).unwrap();

    let spin = host.eval("let i = 0; loop { i += 1; }").unwrap_err();
    let deep = host.eval("fn down(n) { down(n + 1) } down(0)").unwrap_err();

    assert!(spin.to_string().contains("operations"), "{spin}");
    assert!(
        deep.to_string().to_lowercase().contains("stack overflow"),
        "{deep}"
    );
}

#[test]
fn the_interrupt_flag_stops_evaluation_and_runs_on_interrupt_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);
    let code = "on_interrupt(|| write_text(\"ckpt.txt\", \"saved\"));\n\
                let i = 0; loop { i += 1; if i == 1000 { stop_here(); } }";
    let ast = host.compile(&code.replace("stop_here();", "")).unwrap();
    let flag = host.interrupt_flag();

    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let err = host.run_ast(&ast).unwrap_err();
    stopper.join().unwrap();
    let ran = host.run_interrupt_hooks(&ast).unwrap();

    assert!(
        err.to_string().contains("interrupted")
            || matches!(*err, rhai::EvalAltResult::ErrorTerminated(..)),
        "{err}"
    );
    assert_eq!(ran, 1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ckpt.txt")).unwrap(),
        "saved"
    );
    assert!(!host.interrupted(), "flag cleared so the session can go on");
    assert_eq!(host.eval("1 + 1").unwrap().as_int().unwrap(), 2);
}

#[test]
fn plots_from_script_land_under_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);

    host.run(
        "let losses = []; for i in 0..50 { losses.push(1.0 / (i + 1)); }\n\
         plot_curves(\"loss.png\", \"loss\", #{dpo: losses}, #{});\n\
         plot_histogram(\"m.png\", \"margins\", randn([100]), #{bins: 10});\n\
         let labels = []; for i in 0..20 { labels.push(if i < 10 { \"a\" } else { \"b\" }); }\n\
         plot_pca(\"pca.png\", \"pca\", randn([20, 6]), labels, #{});",
    )
    .unwrap();

    for f in ["loss.png", "m.png", "pca.png"] {
        let bytes = std::fs::read(dir.path().join(f)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{f}");
    }
}

#[test]
fn metrics_log_is_fresh_per_run_and_a_resume_keeps_lines_up_to_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);

    host.run(
        "let log = metrics_logger(\"m.jsonl\");\n\
         for s in 0..5 { log.log(s, #{loss: 1.0 / (s + 1)}); }",
    )
    .unwrap();
    let resumed = host
        .eval(
            "let again = metrics_logger(\"m.jsonl\", #{resume_step: 2});\n\
             again.log(3, #{loss: 0.0});\n\
             again.series(\"loss\")",
        )
        .unwrap();

    let text = std::fs::read_to_string(dir.path().join("m.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [0, 1, 2, 3]);
    assert_eq!(resumed.to_string(), "[1.0, 0.5, 0.3333333333333333, 0.0]");
    host.run("let fresh = metrics_logger(\"m.jsonl\");")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("m.jsonl")).unwrap(),
        ""
    );
}

#[test]
fn load_preferences_maps_the_files_own_column_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/mapped_columns.jsonl"
    );
    let mut host = host_with(dir.path(), &[("data", data)]);
    let columns = r#"#{prompt: "question", chosen: "response_j", rejected: "response_k"}"#;
    let code = format!(
        "let m = random_model(#{{family: \"llama\", seed: 1}}); \
         load_preferences(config.data, m, #{{columns: {columns}}}).len()"
    );
    let lines = std::fs::read_to_string(data).unwrap().lines().count();
    let loaded = host.eval(&code).unwrap().as_int().unwrap();
    assert_eq!(loaded, lines as i64);

    let unmapped = host
        .eval(
            "let m = random_model(#{family: \"llama\", seed: 1}); load_preferences(config.data, m)",
        )
        .unwrap_err();
    assert!(
        unmapped.to_string().contains("record 0, field `chosen`"),
        "{unmapped}"
    );
    let unknown = host
        .eval(
            "let m = random_model(#{}); \
             load_preferences(config.data, m, #{columns: #{answer: \"x\"}})",
        )
        .unwrap_err();
    assert!(
        unknown.to_string().contains("unknown column `answer`"),
        "{unknown}"
    );
}

#[test]
fn a_mistyped_function_name_is_answered_with_the_closest_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_with(dir.path(), &[]);
    let err = host.eval("lod_model(\"x\")").unwrap_err().to_string();
    assert!(err.contains("did you mean `load_model`?"), "{err}");

    // Far from every name: no guess.
    let err = host.eval("zzzzzzzz(1)").unwrap_err().to_string();
    assert!(err.contains("Function not found"), "{err}");
    assert!(!err.contains("did you mean"), "{err}");
}
