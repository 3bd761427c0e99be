//! Every record format and container loads into the same normal form: a chat-formatted
//! prompt and two completions ending with EOS. Uses the tiny ChatML tokenizer of
//! tests/fixtures/data/tiny_chatml (made by make_tiny_tokenizer.py beside it) and the example
//! files of examples/data.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ganpo::data::{Columns, Format, LoadConfig, PreferenceDataset, Truncation};
use ganpo::tokenize::{Message, Tokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&root().join("tests/fixtures/data/tiny_chatml")).unwrap()
}

fn example(name: &str) -> PathBuf {
    root().join("examples/data").join(name)
}

fn load(path: &Path, config: &LoadConfig) -> PreferenceDataset {
    PreferenceDataset::load(path, &tokenizer(), config).unwrap()
}

/// The prompt and both completions of pair `i`, decoded with special tokens.
fn texts(data: &PreferenceDataset, i: usize) -> [String; 3] {
    let tok = tokenizer();
    let pair = data.pair(i).unwrap();
    [pair.prompt, pair.chosen, pair.rejected].map(|ids| tok.decode(ids, false).unwrap())
}

const DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n";

#[test]
fn tiny_tokenizer_from_dir_matches_transformers() {
    let path = root().join("tests/fixtures/data/tiny_chatml_expected.json");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = tokenizer();

    let messages: Vec<Message> = serde_json::from_value(expected["conversation"].clone()).unwrap();
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, expected["rendered"].as_str().unwrap());
    let ids: Vec<u32> = serde_json::from_value(expected["ids"].clone()).unwrap();
    assert_eq!(tok.encode(&rendered, false).unwrap(), ids);
    let text_ids: Vec<u32> = serde_json::from_value(expected["text_ids"].clone()).unwrap();
    assert_eq!(
        tok.encode(expected["text"].as_str().unwrap(), false)
            .unwrap(),
        text_ids
    );
}

#[test]
fn standard_jsonl_is_rendered_as_one_user_turn_and_one_assistant_turn() {
    let data = load(&example("standard.jsonl"), &LoadConfig::default());

    assert_eq!(data.len(), 3);
    assert_eq!(data.report().format, Some(Format::Standard));
    let [prompt, chosen, rejected] = texts(&data, 0);
    assert_eq!(
        prompt,
        format!("{DEFAULT_SYSTEM}<|im_start|>user\nThe sky is<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(chosen, " blue.<|im_end|>\n");
    assert_eq!(rejected, " green.<|im_end|>\n");
}

#[test]
fn standard_text_without_chat_template_appends_the_eos_token() {
    let config = LoadConfig {
        text_as_chat: false,
        ..LoadConfig::default()
    };
    let data = load(&example("standard.jsonl"), &config);

    let [prompt, chosen, rejected] = texts(&data, 1);
    assert_eq!(prompt, "Two plus two equals");
    assert_eq!(chosen, " four.<|im_end|>");
    assert_eq!(rejected, " five.<|im_end|>");
}

#[test]
fn conversational_json_keeps_the_system_prompt_and_earlier_turns() {
    let data = load(&example("conversational.json"), &LoadConfig::default());

    assert_eq!(data.report().format, Some(Format::Conversational));
    let [prompt, chosen, _] = texts(&data, 0);
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n\
         What color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(chosen, "Blue.<|im_end|>\n");

    let [prompt, chosen, rejected] = texts(&data, 1);
    assert!(prompt.ends_with(
        "<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\n1, 2, 3.<|im_end|>\n\
         <|im_start|>user\nNow backwards.<|im_end|>\n<|im_start|>assistant\n"
    ));
    assert_eq!(
        (chosen.as_str(), rejected.as_str()),
        ("3, 2, 1.<|im_end|>\n", "1, 2, 3.<|im_end|>\n")
    );
}

#[test]
fn implicit_prompt_is_the_shared_prefix_of_the_two_conversations() {
    let data = load(&example("implicit_prompt.jsonl"), &LoadConfig::default());

    assert_eq!(data.report().format, Some(Format::ImplicitPrompt));
    let [prompt, chosen, rejected] = texts(&data, 1);
    assert!(prompt.contains("<|im_start|>assistant\nHello!<|im_end|>\n"));
    assert!(prompt.ends_with("Where is the sun?<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(chosen, "In the sky.<|im_end|>\n");
    assert_eq!(rejected, "In the sea.<|im_end|>\n");
}

#[test]
fn sharegpt_maps_roles_and_takes_a_system_turn_or_column() {
    let data = load(&example("sharegpt.json"), &LoadConfig::default());

    assert_eq!(data.report().format, Some(Format::ShareGpt));
    assert_eq!(data.len(), 3);
    let [prompt, chosen, _] = texts(&data, 0);
    assert!(prompt.starts_with("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"));
    assert_eq!(chosen, "7 is prime.<|im_end|>\n");

    let [prompt, _, rejected] = texts(&data, 1);
    assert!(prompt.contains("<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\nSay bye."));
    assert_eq!(rejected, "Hi!<|im_end|>\n");

    let [prompt, ..] = texts(&data, 2);
    assert!(prompt.starts_with("<|im_start|>system\nAnswer in French.<|im_end|>\n"));
}

#[test]
fn columns_can_be_mapped_to_other_names() {
    let config = LoadConfig {
        columns: Columns {
            prompt: "question".into(),
            chosen: "response_j".into(),
            rejected: "response_k".into(),
            ..Columns::default()
        },
        ..LoadConfig::default()
    };
    let data = load(&example("mapped_columns.jsonl"), &config);

    assert_eq!(data.len(), 2);
    let [prompt, chosen, rejected] = texts(&data, 0);
    assert!(prompt.contains("<|im_start|>user\nIs water wet?<|im_end|>"));
    assert_eq!(chosen, "Yes, in everyday terms.<|im_end|>\n");
    assert_eq!(rejected, "No.<|im_end|>\n");
}

#[test]
fn a_single_parquet_file_loads() {
    let data = load(&example("parquet/standard.parquet"), &LoadConfig::default());

    assert_eq!(data.len(), 2);
    let [prompt, chosen, _] = texts(&data, 1);
    assert!(prompt.contains("<|im_start|>user\nWater boils at<|im_end|>"));
    assert_eq!(chosen, " 100 C.<|im_end|>\n");
}

#[test]
fn a_folder_of_parquet_shards_loads_the_named_split_in_shard_order() {
    let train = LoadConfig {
        split: Some("train_prefs".into()),
        ..LoadConfig::default()
    };
    let data = load(&example("parquet"), &train);

    assert_eq!(data.report().files.len(), 2);
    assert_eq!(data.len(), 4);
    assert_eq!(data.report().format, Some(Format::Conversational));
    let [prompt, chosen, rejected] = texts(&data, 2);
    assert!(prompt.ends_with("<|im_start|>user\nSpell 'cat'.<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(
        (chosen.as_str(), rejected.as_str()),
        ("C-A-T.<|im_end|>\n", "K-A-T.<|im_end|>\n")
    );

    let test = LoadConfig {
        split: Some("test_prefs".into()),
        ..LoadConfig::default()
    };
    assert_eq!(load(&example("parquet"), &test).len(), 1);
}

#[test]
fn a_batch_puts_chosen_rows_first_with_right_padding_and_completion_masks() {
    let data = load(&example("conversational.json"), &LoadConfig::default());

    let batch = data.batch(&[1, 0], &Device::Cpu).unwrap();
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let attention = batch.attention_mask.to_vec2::<f32>().unwrap();
    let completion = batch.completion_mask.to_vec2::<f32>().unwrap();

    assert_eq!(batch.input_ids.dims()[0], 4);
    assert_eq!(batch.indices, vec![1, 0]);
    let rows = [
        (1, "chosen"),
        (0, "chosen"),
        (1, "rejected"),
        (0, "rejected"),
    ];
    for (r, (i, side)) in rows.into_iter().enumerate() {
        let pair = data.pair(i).unwrap();
        let answer = if side == "chosen" {
            pair.chosen
        } else {
            pair.rejected
        };
        let (p, n) = (pair.prompt.len(), pair.prompt.len() + answer.len());
        assert_eq!(batch.prompt_lengths[r], p);
        assert_eq!(&ids[r][..p], pair.prompt, "row {r}");
        assert_eq!(&ids[r][p..n], answer, "row {r}");
        assert!(attention[r][..n].iter().all(|&a| a == 1.0));
        assert!(attention[r][n..].iter().all(|&a| a == 0.0));
        assert!(completion[r][..p].iter().all(|&m| m == 0.0));
        assert!(completion[r][p..n].iter().all(|&m| m == 1.0));
        assert!(completion[r][n..].iter().all(|&m| m == 0.0));
        assert!(ids[r][n..].iter().all(|&t| t == data.pad_token_id()));
    }
}

#[test]
fn truncation_keep_end_cuts_the_prompt_start_and_is_reported() {
    let config = LoadConfig {
        max_length: Some(12),
        truncation: Truncation::KeepEnd,
        ..LoadConfig::default()
    };
    let data = load(&example("conversational.json"), &config);

    assert_eq!(data.report().truncated, vec![0, 1]);
    let batch = data.batch(&[0], &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.dims(), &[2, 12]);
    let pair = data.pair(0).unwrap();
    let row = batch.input_ids.to_vec2::<u32>().unwrap()[0].clone();
    assert_eq!(&row[12 - pair.chosen.len()..], pair.chosen);
    assert_eq!(batch.prompt_lengths[0], 12 - pair.chosen.len());
}

#[test]
fn truncation_keep_start_drops_pairs_whose_prompt_fills_max_length_and_lists_them() {
    let config = LoadConfig {
        max_length: Some(20),
        ..LoadConfig::default()
    };
    let data = load(&example("conversational.json"), &config);

    assert_eq!(data.report().dropped_prompt_too_long, vec![0, 1]);
    assert!(data.is_empty());
}

#[test]
fn train_eval_split_is_disjoint_complete_and_reproducible() {
    let path = example("standard.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let many: String = (0..20).map(|_| text.as_str()).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sixty.jsonl");
    std::fs::write(&file, many).unwrap();
    let data = load(&file, &LoadConfig::default());

    let (train, eval) = data.train_eval_split(0.25, 7).unwrap();

    assert_eq!((train.len(), eval.len()), (45, 15));
    let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..60).collect::<Vec<_>>());
    assert_eq!(
        data.train_eval_split(0.25, 7).unwrap(),
        (train.clone(), eval.clone())
    );
    assert_ne!(data.train_eval_split(0.25, 8).unwrap().1, eval);
}
