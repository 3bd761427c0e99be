//! The flavour of the issue on the real SmolLM2-135M-Instruct (skipped when the asset is
//! absent): load it from a script, chat, and read its config.

use std::path::PathBuf;
use std::process::Command;

fn asset(name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
    let path = root.join(name);
    if path.exists() {
        Some(path)
    } else {
        println!(
            "SKIPPED script_real_model: asset {} absent (run scripts/fetch-assets.sh)",
            path.display()
        );
        None
    }
}

#[test]
fn a_script_loads_smollm2_and_it_answers_paris() {
    let Some(gguf) = asset("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let code = "let policy = load_model(config.model, #{dtype: \"f32\"});\n\
                print(policy.chat(\"What is the capital of France?\", #{max_new_tokens: 16}));\n\
                print(policy.config.layers);";

    let out = Command::new(env!("CARGO_BIN_EXE_ganpo-run"))
        .args(["--out", out_dir.path().to_str().unwrap()])
        .args(["--set", &format!("model={}", gguf.display()), "-e", code])
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Expected answer from ../shared/ASSETS.md (checked with candle's quantized llama).
    assert_eq!(
        stdout.lines().next(),
        Some("The capital of France is Paris.")
    );
    assert_eq!(stdout.lines().nth(1), Some("30"));
}
