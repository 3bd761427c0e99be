//! SmolLM2's tokenizer rebuilt from GGUF metadata matches transformers' GGUF tokenizer: ids,
//! decoding and chat templates. Expected values: tests/fixtures/data/smollm2_tokenizer.json,
//! written by make_smollm2_fixture.py beside it (transformers 5.25.0, tokenizers, jinja2).

use std::path::PathBuf;

use ganpo::tokenize::{Message, Tokenizer};
use serde_json::Value;

fn assets() -> PathBuf {
    std::env::var_os("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

fn smollm2(test: &str) -> Option<Tokenizer> {
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
            path.display()
        );
        return None;
    }
    Some(Tokenizer::from_gguf_file(&path).expect("SmolLM2 tokenizer loads"))
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/smollm2_tokenizer.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn gguf_tokenizer_encodes_like_transformers() {
    let Some(tokenizer) = smollm2("gguf_tokenizer_encodes_like_transformers") else {
        return;
    };
    let fixture = fixture();

    for case in fixture["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let got = tokenizer.encode(text, add_special).unwrap();
        assert_eq!(
            got,
            ids(&case["ids"]),
            "text {text:?}, add_special {add_special}"
        );
    }
}

#[test]
fn gguf_tokenizer_decodes_like_transformers() {
    let Some(tokenizer) = smollm2("gguf_tokenizer_decodes_like_transformers") else {
        return;
    };
    let fixture = fixture();

    for case in fixture["decode"].as_array().unwrap() {
        let skip = case["skip_special"].as_bool().unwrap();
        let got = tokenizer.decode(&ids(&case["ids"]), skip).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "skip_special {skip}");
    }
}

#[test]
fn gguf_tokenizer_knows_smollm2_special_tokens() {
    let Some(tokenizer) = smollm2("gguf_tokenizer_knows_smollm2_special_tokens") else {
        return;
    };
    let special = &fixture()["special"];

    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(
        tokenizer.eos_token_id(),
        Some(special["eos_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tokenizer.special_token("bos_token"),
        special["bos"].as_str()
    );
    assert_eq!(
        tokenizer.special_token("pad_token"),
        special["pad"].as_str()
    );
    assert_eq!(
        tokenizer.special_token("unk_token"),
        special["unk"].as_str()
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        special["vocab_size"].as_u64().unwrap()
    );
}

#[test]
fn gguf_chat_template_renders_like_transformers() {
    let Some(tokenizer) = smollm2("gguf_chat_template_renders_like_transformers") else {
        return;
    };
    let fixture = fixture();

    for case in fixture["chat"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let got = tokenizer
            .apply_chat_template(&messages, generation)
            .unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "messages {messages:?}");
    }
}

#[test]
fn saved_tokenizer_reloads_with_identical_ids_and_template() {
    let Some(tokenizer) = smollm2("saved_tokenizer_reloads_with_identical_ids_and_template") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    tokenizer.save(dir.path()).unwrap();
    let reloaded = Tokenizer::from_dir(dir.path()).unwrap();

    let text = "<|im_start|>user\nhéllo 2024  world<|im_end|>\n";
    assert_eq!(
        reloaded.encode(text, true).unwrap(),
        tokenizer.encode(text, true).unwrap()
    );
    assert_eq!(reloaded.chat_template(), tokenizer.chat_template());
    assert_eq!(reloaded.eos_token_id(), Some(2));
}

#[test]
fn encoding_a_shared_prefix_once_gives_the_same_ids_as_encoding_each_text() {
    let test = "encoding_a_shared_prefix_once_gives_the_same_ids_as_encoding_each_text";
    let Some(tokenizer) = smollm2(test) else {
        return;
    };
    let path = assets().join("data/dpo_en_demo.json");
    if !path.exists() {
        println!(
            "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
            path.display()
        );
        return;
    }
    let demo: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let message = |turn: &Value| {
        let role = if turn["from"] == "gpt" {
            "assistant"
        } else {
            "user"
        };
        Message::new(role, turn["value"].as_str().unwrap())
    };

    for (i, row) in demo.as_array().unwrap().iter().enumerate() {
        let prompt: Vec<Message> = row["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(message)
            .collect();
        let with = |answer: &Value| {
            let mut messages = prompt.clone();
            messages.push(message(answer));
            tokenizer.apply_chat_template(&messages, false).unwrap()
        };
        let texts = [
            tokenizer.apply_chat_template(&prompt, true).unwrap(),
            with(&row["chosen"]),
            with(&row["rejected"]),
        ];

        let shared = tokenizer
            .encode_sharing_prefix(&texts.each_ref().map(String::as_str))
            .unwrap();

        for (text, ids) in texts.iter().zip(&shared) {
            assert_eq!(ids, &tokenizer.encode(text, false).unwrap(), "pair {i}");
        }
    }
}

#[test]
fn sentencepiece_gguf_vocabulary_encodes_and_decodes_like_transformers() {
    // tiny_llama_vocab.gguf and its expected ids: make_sentencepiece_gguf.py (transformers
    // 5.25.0), a `llama` vocabulary with scores, byte tokens and BOS added.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data");
    let tokenizer = Tokenizer::from_gguf_file(&PathBuf::from(dir).join("tiny_llama_vocab.gguf"));
    let tokenizer = tokenizer.unwrap();
    let expected_path = PathBuf::from(dir).join("tiny_llama_vocab_expected.json");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(expected_path).unwrap()).unwrap();

    for case in expected["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let got = tokenizer.encode(text, add_special).unwrap();
        assert_eq!(
            got,
            ids(&case["ids"]),
            "text {text:?}, add_special {add_special}"
        );
    }
    for case in expected["decode"].as_array().unwrap() {
        let got = tokenizer.decode(&ids(&case["ids"]), true).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap());
    }
    assert_eq!(
        (tokenizer.bos_token_id(), tokenizer.eos_token_id()),
        (Some(1), Some(2))
    );
}

#[test]
fn tokenizer_is_cloneable_and_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Tokenizer>();
}

#[test]
fn byte_level_gguf_uses_the_split_regex_of_its_pre_tokenizer_family() {
    // tiny_bpe_*.gguf and tiny_bpe_expected.json: make_byte_level_ggufs.py (transformers
    // 5.25.0); the three files differ only in `tokenizer.ggml.pre`.
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data"));
    let text = std::fs::read_to_string(dir.join("tiny_bpe_expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();

    for (file, cases) in expected["files"].as_object().unwrap() {
        let tokenizer = Tokenizer::from_gguf_file(&dir.join(file)).unwrap();
        for case in cases.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tokenizer.encode(text, false).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{file}: {text:?}");
        }
    }
}
