//! The real SmolLM2-135M-Instruct GGUF: loading, logits parity with transformers' own GGUF
//! loader, and greedy chat generation.
//!
//! Expected numbers come from `tests/fixtures/model/smollm2_gguf.json`, written by
//! `tests/fixtures/model/make_fixtures.py --gguf ...` (transformers 5.25.0, torch 2.9.1, f32):
//! the chat-formatted prompt "What is the capital of France?", its token ids, the first 8
//! logits at every position, the top 10 at the last one, and transformers' greedy reply.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use ganpo::model::{
    generate::FinishReason, CausalLm, ForwardOptions, GenerateOptions, LoadOptions,
};
use ganpo::tokenize::Message;
use serde_json::Value;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn asset(name: &str) -> Option<PathBuf> {
    let root = std::env::var("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
    let path = root.join(name);
    path.exists().then_some(path)
}

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/smollm2_gguf.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

macro_rules! model_or_skip {
    ($test:literal) => {
        match asset(MODEL_FILE) {
            Some(path) => {
                let start = Instant::now();
                let loaded =
                    CausalLm::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
                println!("loaded {} in {:.2?}", path.display(), start.elapsed());
                loaded
            }
            None => {
                println!(
                    "SKIPPED {}: asset {MODEL_FILE} absent (run scripts/fetch-assets.sh)",
                    $test
                );
                return;
            }
        }
    };
}

#[test]
fn smollm2_gguf_config_is_read_from_metadata() {
    let loaded = model_or_skip!("smollm2_gguf_config_is_read_from_metadata");
    let cfg = loaded.model.config();
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (9, 3));
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.rope.theta, 100000.0);
    assert!(cfg.tie_word_embeddings);
}

#[test]
fn smollm2_gguf_logits_match_transformers_gguf_loading() {
    let model = model_or_skip!("smollm2_gguf_logits_match_transformers_gguf_loading").model;
    let fixture = fixture();
    let ids = ids_of(&fixture["input_ids"]);
    let t = ids.len();
    let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), candle_core::DType::F32, &Device::Cpu).unwrap();

    let start = Instant::now();
    let out = model
        .forward(&input, &mask, &ForwardOptions::default())
        .unwrap();
    println!("forward of {t} tokens in {:.2?}", start.elapsed());
    let logits = out.logits.unwrap().squeeze(0).unwrap();

    let expected: Vec<Vec<f32>> = fixture["logits_first8_every_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let ours = logits.narrow(1, 0, 8).unwrap().to_vec2::<f32>().unwrap();
    let mut max_error = 0f32;
    for (a, b) in ours.iter().flatten().zip(expected.iter().flatten()) {
        max_error = max_error.max((a - b).abs());
    }
    println!("first 8 logits at every position: max abs error {max_error:.2e}");
    assert!(max_error <= 1e-3, "max abs error {max_error}");

    let last = logits.get(t - 1).unwrap().to_vec1::<f32>().unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top, ids_of(&fixture["last_top10_ids"])[..5].to_vec());
    let top_values = fixture["last_top10_values"].as_array().unwrap();
    for (rank, &index) in order[..10].iter().enumerate() {
        let expected = top_values[rank].as_f64().unwrap() as f32;
        assert!(
            (last[index] - expected).abs() <= 1e-3,
            "top {rank}: {} vs {expected}",
            last[index]
        );
    }
}

#[test]
fn smollm2_answers_paris_greedily_like_transformers() {
    let model = model_or_skip!("smollm2_answers_paris_greedily_like_transformers").model;
    let fixture = fixture();
    let prompt = ids_of(&fixture["input_ids"]);
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..GenerateOptions::default()
    };

    let start = Instant::now();
    let generations = model.generate(&[prompt], &opts, None).unwrap();
    println!(
        "generated {} tokens in {:.2?}",
        generations[0].tokens.len(),
        start.elapsed()
    );

    // transformers' reply is "The capital of France is Paris.<|im_end|>"; 7042 is " Paris".
    let expected = ids_of(&fixture["greedy_continuation_ids"]);
    assert_eq!(generations[0].tokens, expected);
    assert!(expected.contains(&7042));
    assert_eq!(generations[0].finish, FinishReason::Eos);
}

#[test]
fn smollm2_batched_greedy_equals_single_prompt_runs() {
    let model = model_or_skip!("smollm2_batched_greedy_equals_single_prompt_runs").model;
    let fixture = fixture();
    let long = ids_of(&fixture["input_ids"]);
    let short = long[..long.len() - 12].to_vec();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        ..GenerateOptions::default()
    };

    let batched = model
        .generate(&[short.clone(), long.clone()], &opts, None)
        .unwrap();
    let alone_short = model.generate(&[short], &opts, None).unwrap();
    let alone_long = model.generate(&[long], &opts, None).unwrap();
    assert_eq!(batched[0].tokens, alone_short[0].tokens);
    assert_eq!(batched[1].tokens, alone_long[0].tokens);
}

#[test]
fn smollm2_answers_paris_through_its_own_chat_template() {
    let loaded = model_or_skip!("smollm2_answers_paris_through_its_own_chat_template");
    let tokenizer = loaded.tokenizer.expect("the GGUF carries a tokenizer");
    let fixture = fixture();
    let messages = [Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(prompt, fixture["prompt"].as_str().unwrap());
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids, ids_of(&fixture["input_ids"]));

    let decode = |ids: &[u32]| tokenizer.decode(ids, true);
    let opts = GenerateOptions {
        max_new_tokens: 16,
        eos_token_ids: tokenizer.eos_token_id().into_iter().collect(),
        ..GenerateOptions::default()
    };
    let reply = loaded
        .model
        .generate(std::slice::from_ref(&ids), &opts, Some(&decode))
        .unwrap();
    let text = reply[0].text.clone().unwrap();
    println!("SmolLM2 replies: {text:?}");
    assert!(text.contains("Paris"), "{text}");

    let stop = GenerateOptions {
        stop_strings: vec![" is".into()],
        ..opts
    };
    let cut = loaded.model.generate(&[ids], &stop, Some(&decode)).unwrap();
    assert_eq!(cut[0].finish, FinishReason::StopString);
    assert_eq!(cut[0].text.as_deref(), Some("The capital of France"));
}
