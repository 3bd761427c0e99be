//! Bad input is reported with the file, line, record and field at fault, and with
//! `on_invalid = skip` every skipped record is counted and listed: nothing is dropped silently.

use std::path::{Path, PathBuf};

use ganpo::data::{LoadConfig, OnInvalid, PreferenceDataset};
use ganpo::tokenize::Tokenizer;
use ganpo::Error;

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_chatml");
    Tokenizer::from_dir(&dir).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn skip() -> LoadConfig {
    LoadConfig {
        on_invalid: OnInvalid::Skip,
        ..LoadConfig::default()
    }
}

const GOOD: &str = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;

#[test]
fn malformed_json_array_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[\n{GOOD},\n{{\"prompt\": \"p\", \"chosen\": }}\n]");
    let path = write(dir.path(), "bad.json", text.as_bytes());

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    match &err {
        Error::Parse { path: p, line, .. } => {
            assert_eq!(p, &path);
            assert_eq!(*line, Some(3));
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3: ", path.display())),
        "{err}"
    );
}

#[test]
fn malformed_json_line_reports_file_and_line_or_is_skipped_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{GOOD}\n\n{{\"prompt\": oops}}\n{GOOD}\n");
    let path = write(dir.path(), "bad.jsonl", text.as_bytes());

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3: ", path.display())),
        "{err}"
    );
    assert!(err.to_string().contains("malformed JSON"), "{err}");

    let data = PreferenceDataset::load(&path, &tokenizer(), &skip()).unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data.report().skipped.len(), 1);
    assert_eq!(data.report().skipped[0].index, 1);
}

#[test]
fn a_record_missing_a_field_names_the_record_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[{GOOD}, {GOOD}, {{\"prompt\": \"p\", \"chosen\": \"a\"}}]");
    let path = write(dir.path(), "missing.json", text.as_bytes());

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    match err {
        Error::Record { record, field, .. } => {
            assert_eq!((record, field.as_str()), (2, "rejected"))
        }
        other => panic!("expected a record error, got {other:?}"),
    }
}

#[test]
fn empty_completions_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"[{"prompt": "p", "chosen": "  ", "rejected": "b"}]"#;
    let path = write(dir.path(), "empty.json", text.as_bytes());

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("record 0, field `chosen`: empty completion"),
        "{err}"
    );
}

#[test]
fn identical_chosen_and_rejected_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let text = concat!(
        r#"{"conversations": [{"from": "human", "value": "q"}], "#,
        r#""chosen": {"from": "gpt", "value": "same"}, "#,
        r#""rejected": {"from": "gpt", "value": "same"}}"#
    );
    let path = write(dir.path(), "same.jsonl", text.as_bytes());

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("field `rejected`: identical to chosen"),
        "{err}"
    );
}

#[test]
fn non_utf8_text_is_reported_by_line_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"caf\xe9\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let path = write(dir.path(), "latin1.jsonl", &bytes);

    let err = PreferenceDataset::load(&path, &tokenizer(), &LoadConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2: ", path.display())),
        "{err}"
    );
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");

    let data = PreferenceDataset::load(&path, &tokenizer(), &skip()).unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data.report().skipped[0].index, 1);
}

#[test]
fn non_utf8_text_in_a_json_array_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes =
        b"[\n{\"prompt\": \"caf\xe9\", \"chosen\": \"a\", \"rejected\": \"b\"}\n]".to_vec();
    bytes.push(b'\n');
    let path = write(dir.path(), "latin1.json", &bytes);

    let err = PreferenceDataset::load(&path, &tokenizer(), &skip()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2: ", path.display())),
        "{err}"
    );
}

#[test]
fn skip_counts_and_lists_every_invalid_record() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[{GOOD}, {{\"prompt\": \"p\", \"chosen\": \"\", \"rejected\": \"b\"}}, {GOOD}, \
         {{\"prompt\": \"p\", \"chosen\": \"x\", \"rejected\": \"x\"}}, {{\"prompt\": \"p\"}}, 7]"
    );
    let path = write(dir.path(), "mixed.json", text.as_bytes());

    let data = PreferenceDataset::load(&path, &tokenizer(), &skip()).unwrap();
    let report = data.report();
    assert_eq!((report.records, report.loaded), (6, 2));
    let skipped: Vec<usize> = report.skipped.iter().map(|s| s.index).collect();
    assert_eq!(skipped, vec![1, 3, 4, 5]);
    let shown = report.to_string();
    assert!(shown.contains("skipped: 4"), "{shown}");
    assert!(
        shown.contains("skipped record 3: field `rejected`: identical to chosen"),
        "{shown}"
    );
    assert_eq!(data.record_index(1), Some(2));
}

#[test]
fn a_missing_split_names_the_files_found() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/parquet");
    let config = LoadConfig {
        split: Some("validation".into()),
        ..LoadConfig::default()
    };

    let err = PreferenceDataset::load(&dir, &tokenizer(), &config).unwrap_err();
    assert!(
        err.to_string()
            .contains("train_prefs-00000-of-00002.parquet"),
        "{err}"
    );
}

#[test]
fn a_record_limit_stops_reading_before_later_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let array = write(
        dir.path(),
        "cut.json",
        format!("[{GOOD}, {GOOD}, {{oops").as_bytes(),
    );
    let lines = write(
        dir.path(),
        "cut.jsonl",
        format!("{GOOD}\n{GOOD}\n{{oops\n").as_bytes(),
    );
    let config = LoadConfig {
        limit: Some(2),
        ..LoadConfig::default()
    };

    for path in [array, lines] {
        let data = PreferenceDataset::load(&path, &tokenizer(), &config).unwrap();
        assert_eq!(
            (data.report().records, data.len()),
            (2, 2),
            "{}",
            path.display()
        );
    }
}
