//! Robustness statistics and held-out preference evaluation on a tiny random Llama with the
//! tiny ChatML tokenizer; statistic definitions checked on hand-made token sequences.

use std::path::Path;

use candle_core::{DType, Device};
use ganpo::data::{LoadConfig, PreferenceDataset, RawPair, Turns};
use ganpo::eval::robustness::{mean_answer_logps, tables_text, temperature_stats};
use ganpo::eval::{
    evaluate_preferences, plot_robustness, run_robustness, PreferenceEvalConfig, Progress,
    RobustnessConfig, RobustnessTable,
};
use ganpo::model::{CausalLm, Family, LoadOptions, ModelConfig};
use ganpo::tokenize::Tokenizer;

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_chatml");
    Tokenizer::from_dir(&dir).unwrap()
}

fn tiny_model(tokenizer: &Tokenizer, seed: u64) -> CausalLm {
    let mut config = ModelConfig::tiny(Family::Llama);
    config.vocab_size = tokenizer.vocab_size();
    config.eos_token_ids = vec![tokenizer.eos_token_id().unwrap()];
    config.max_position_embeddings = 512;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: false,
    };
    CausalLm::new_random(config, &opts, seed).unwrap()
}

#[test]
fn temperature_stats_follow_their_definitions_on_hand_made_answers() {
    // Two answers (EOS already removed): a loop of 1 2 3 4 and a short distinct one.
    let answers = vec![vec![1, 2, 3, 4, 1, 2, 3, 4, 1], vec![5, 6, 7]];

    let stats = temperature_stats(1.0, &answers, 1, &[Some(-2.0), Some(-4.0)], vec![]);

    assert_eq!(stats.answers, 2);
    assert_eq!(stats.mean_length, 6.0);
    // 12 unigrams, 7 different.
    assert_eq!(stats.distinct_1, Some(7.0 / 12.0));
    // Bigrams: 12 23 34 41 12 23 34 41 | 56 67 -> 10 in all, 6 different.
    assert_eq!(stats.distinct_2, Some(0.6));
    // 4-grams of the loop: 1234 2341 3412 4123 1234 2341 -> 2 repeats of 6; none in the other.
    assert_eq!(stats.repetition_4, Some(2.0 / 6.0));
    assert_eq!(stats.eos_fraction, 0.5);
    assert_eq!(stats.reference_mean_logp, Some(-3.0));
}

#[test]
fn robustness_gives_one_row_per_temperature_with_statistics_in_range() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 3);
    let prompts: Vec<String> = ["Say hi.", "Name a colour.", "Count."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cfg = RobustnessConfig {
        temperatures: vec![0.7, 1.5],
        max_new_tokens: 10,
        batch_size: 2,
        ..RobustnessConfig::default()
    };
    let mut calls = 0;

    let table = run_robustness(
        "tiny",
        &model,
        &tok,
        &model,
        &prompts,
        &cfg,
        &mut |_: &Progress| calls += 1,
    )
    .unwrap();

    assert_eq!(calls, 4, "two batches per temperature");
    assert_eq!(table.rows.len(), 2);
    for row in &table.rows {
        assert_eq!(row.answers, 3);
        assert_eq!(row.texts.len(), 3);
        assert!(row.mean_length > 0.0 && row.mean_length <= 10.0);
        assert!((0.0..=1.0).contains(&row.eos_fraction));
        assert!(row.distinct_1.unwrap() > 0.0 && row.distinct_1.unwrap() <= 1.0);
        assert!(row.reference_mean_logp.unwrap() < 0.0);
    }
    let json = serde_json::to_string(&table).unwrap();
    let back: RobustnessTable = serde_json::from_str(&json).unwrap();
    assert_eq!(back.model, table.model);
    for (b, row) in back.rows.iter().zip(&table.rows) {
        assert_eq!(b.texts, row.texts);
        // JSON keeps 17 significant digits; the last bit of a float may differ.
        assert!((b.distinct_1.unwrap() - row.distinct_1.unwrap()).abs() < 1e-12);
        assert!((b.reference_mean_logp.unwrap() - row.reference_mean_logp.unwrap()).abs() < 1e-12);
    }
    let text = tables_text(&[table.clone(), table.clone()]);
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.starts_with("model") && text.contains("tiny"));

    let png = std::env::temp_dir().join(format!("ganpo-eval-robust-{}.png", std::process::id()));
    plot_robustness(&png, &[table.clone(), table]).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}

#[test]
fn a_random_model_scores_answers_near_uniform_log_prob() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 5);
    let prompts = vec![vec![10, 11, 12], vec![13, 14]];
    let answers = vec![vec![20, 21, 22, 23], vec![]];

    let logps = mean_answer_logps(&model, &prompts, &answers).unwrap();

    // A random tiny model is close to uniform over its vocabulary: log(1/V).
    let uniform = -(tok.vocab_size() as f64).ln();
    let first = logps[0].unwrap();
    assert!((first - uniform).abs() < 1.0, "{first} vs {uniform}");
    assert_eq!(logps[1], None, "an empty answer has no mean");
}

fn pairs() -> Vec<RawPair> {
    let text = |s: &str| Turns::Text(s.to_string());
    vec![
        RawPair {
            prompt: text("Say hi."),
            chosen: text("Hi there!"),
            rejected: text("No."),
        },
        RawPair {
            prompt: text("Name a colour."),
            chosen: text("Blue."),
            rejected: text("A colour is a colour is a colour."),
        },
        RawPair {
            prompt: text("Count to three."),
            chosen: text("One, two, three."),
            rejected: text("Three."),
        },
    ]
}

#[test]
fn a_model_against_itself_has_zero_dpo_margins_and_consistent_simpo_rewards() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 9);
    let data = PreferenceDataset::from_pairs(&pairs(), &tok, &LoadConfig::default()).unwrap();
    let cfg = PreferenceEvalConfig {
        batch_size: 2,
        ..PreferenceEvalConfig::default()
    };
    let mut done = vec![];

    let report = evaluate_preferences(&model, Some(&model), &data, &cfg, &mut |p: &Progress| {
        done.push(p.done)
    })
    .unwrap();

    assert_eq!(done, vec![2, 3]);
    assert_eq!(report.pairs, 3);
    let dpo = report.dpo.unwrap();
    assert_eq!(
        (dpo.accuracy, dpo.margin),
        (0.0, 0.0),
        "identical models, no reward"
    );
    let logps = report.policy_logps;
    assert!((logps.margin - (logps.chosen - logps.rejected)).abs() < 1e-9);
    assert!([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0].contains(&logps.accuracy));
    assert!(report.simpo.chosen < 0.0 && report.simpo.rejected < 0.0);
    let metrics = report.metrics();
    assert_eq!(metrics["rewards/margins"], 0.0);
    assert_eq!(metrics["simpo/rewards/accuracies"], report.simpo.accuracy);
}

#[test]
fn another_reference_gives_dpo_rewards_of_beta_times_the_logp_gap() {
    let tok = tokenizer();
    let policy = tiny_model(&tok, 9);
    let reference = tiny_model(&tok, 10);
    let data = PreferenceDataset::from_pairs(&pairs(), &tok, &LoadConfig::default()).unwrap();
    let noop = &mut |_: &Progress| {};
    let cfg = PreferenceEvalConfig::default();

    let against = evaluate_preferences(&policy, Some(&reference), &data, &cfg, noop).unwrap();
    let reference_alone = evaluate_preferences(&reference, None, &data, &cfg, noop).unwrap();

    assert!(reference_alone.dpo.is_none());
    let dpo = against.dpo.unwrap();
    let expected = cfg.beta * (against.policy_logps.chosen - reference_alone.policy_logps.chosen);
    assert!(
        (dpo.chosen - expected).abs() < 1e-6,
        "{} vs {expected}",
        dpo.chosen
    );
    assert_ne!(dpo.margin, 0.0);
}

#[test]
fn evaluating_chosen_indices_scores_exactly_those_pairs_in_order() {
    let tok = tokenizer();
    let policy = tiny_model(&tok, 9);
    let reference = tiny_model(&tok, 10);
    let data = PreferenceDataset::from_pairs(&pairs(), &tok, &LoadConfig::default()).unwrap();
    let noop = &mut |_: &Progress| {};
    let run = |indices: Vec<usize>| {
        let cfg = PreferenceEvalConfig {
            batch_size: 2,
            indices: Some(indices),
            ..PreferenceEvalConfig::default()
        };
        evaluate_preferences(
            &policy,
            Some(&reference),
            &data,
            &cfg,
            &mut |_: &Progress| {},
        )
    };

    let all = evaluate_preferences(
        &policy,
        Some(&reference),
        &data,
        &PreferenceEvalConfig::default(),
        noop,
    )
    .unwrap();
    let picked = run(vec![2, 0]).unwrap();
    assert_eq!(picked.pairs, 2);
    assert_eq!(picked.margins.len(), 2);
    assert!((picked.margins[0] - all.margins[2]).abs() < 1e-5);
    assert!((picked.margins[1] - all.margins[0]).abs() < 1e-5);
    let mean = (picked.margins[0] + picked.margins[1]) / 2.0;
    assert!((picked.dpo.unwrap().margin - mean).abs() < 1e-9);

    let err = run(vec![0, 99]).unwrap_err().to_string();
    assert!(err.contains("pair index 99 is out of range"), "{err}");
}
