//! The README's script reference is the registry's own text: regenerate it with
//! `cargo run --bin ganpo-run -- --help-markdown` when a function is added or changed.

use ganpo::script::{Host, HostOptions};

const START: &str = "<!-- reference:start -->\n";
const END: &str = "<!-- reference:end -->";

#[test]
fn readme_script_reference_equals_the_registry_markdown() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find(START)
        .expect("README.md has no reference:start marker")
        + START.len();
    let end = readme
        .find(END)
        .expect("README.md has no reference:end marker");

    let host = Host::new(HostOptions::default()).expect("host");
    let generated = host.registry().markdown();
    assert!(
        readme[start..end] == generated,
        "README.md's script reference is stale: regenerate it with \
         `cargo run --bin ganpo-run -- --help-markdown` between the reference markers"
    );
}
