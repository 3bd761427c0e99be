//! LLaMA-Factory's dpo_en_demo.json through SmolLM2's GGUF tokenizer and ChatML template:
//! all 300 pairs load, and known pairs tokenize exactly as TRL 1.16's DPOTrainer tokenizes
//! them with transformers (tests/fixtures/data/smollm2_tokenizer.json, written by
//! make_smollm2_fixture.py beside it with transformers 5.25.0).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use ganpo::data::{BatchConfig, Columns, Format, LoadConfig, PreferenceDataset, Truncation};
use ganpo::tokenize::Tokenizer;

fn assets() -> PathBuf {
    std::env::var_os("GANPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

/// SmolLM2's tokenizer and the demo file, or `None` (with a visible SKIPPED line).
fn inputs(test: &str) -> Option<(Tokenizer, PathBuf)> {
    let gguf = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let data = assets().join("data/dpo_en_demo.json");
    for path in [&gguf, &data] {
        if !path.exists() {
            println!(
                "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
                path.display()
            );
            return None;
        }
    }
    Some((Tokenizer::from_gguf_file(&gguf).unwrap(), data))
}

fn fixture_pairs() -> Vec<serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/smollm2_tokenizer.json"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fixture["dpo_en_demo_pairs"].as_array().unwrap().clone()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn all_300_demo_pairs_load_as_sharegpt() {
    let Some((tokenizer, path)) = inputs("all_300_demo_pairs_load_as_sharegpt") else {
        return;
    };

    let data = PreferenceDataset::load(&path, &tokenizer, &LoadConfig::default()).unwrap();

    let report = data.report();
    assert_eq!(report.format, Some(Format::ShareGpt));
    assert_eq!((report.records, report.loaded), (300, 300));
    assert!(report.skipped.is_empty() && report.truncated.is_empty());
    for i in 0..data.len() {
        let pair = data.pair(i).unwrap();
        assert!(
            pair.chosen.contains(&2) && pair.rejected.contains(&2),
            "pair {i} lacks EOS"
        );
    }
}

#[test]
fn known_pairs_tokenize_exactly_as_trl_with_transformers() {
    let Some((tokenizer, path)) = inputs("known_pairs_tokenize_exactly_as_trl_with_transformers")
    else {
        return;
    };
    let config = LoadConfig {
        limit: Some(5),
        ..LoadConfig::default()
    };

    let data = PreferenceDataset::load(&path, &tokenizer, &config).unwrap();

    for expected in fixture_pairs() {
        let i = expected["index"].as_u64().unwrap() as usize;
        let pair = data.pair(i).unwrap();
        let prompt_text = tokenizer.decode(pair.prompt, false).unwrap();
        assert_eq!(
            prompt_text,
            expected["prompt_text"].as_str().unwrap(),
            "pair {i}"
        );
        assert_eq!(pair.prompt, ids(&expected["prompt_ids"]), "pair {i} prompt");
        assert_eq!(pair.chosen, ids(&expected["chosen_ids"]), "pair {i} chosen");
        assert_eq!(
            pair.rejected,
            ids(&expected["rejected_ids"]),
            "pair {i} rejected"
        );
    }
}

#[test]
fn completion_mask_covers_exactly_the_completion_tokens_and_eos() {
    let Some((tokenizer, path)) =
        inputs("completion_mask_covers_exactly_the_completion_tokens_and_eos")
    else {
        return;
    };
    let config = LoadConfig {
        limit: Some(5),
        ..LoadConfig::default()
    };
    let data = PreferenceDataset::load(&path, &tokenizer, &config).unwrap();

    let batch = data.batch(&[4, 1], &Device::Cpu).unwrap();

    let input_ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let mask = batch.completion_mask.to_vec2::<f32>().unwrap();
    let expected = fixture_pairs();
    // Fixture entries: 0 = pair 0, 1 = pair 1 (system prompt), 2 = pair 4 (multi-turn).
    let rows = [
        (2, "chosen_ids"),
        (1, "chosen_ids"),
        (2, "rejected_ids"),
        (1, "rejected_ids"),
    ];
    for (r, (entry, key)) in rows.into_iter().enumerate() {
        let completion = ids(&expected[entry][key]);
        let masked: Vec<u32> = input_ids[r]
            .iter()
            .zip(&mask[r])
            .filter(|(_, &m)| m == 1.0)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(masked, completion, "row {r}");
        let first = mask[r].iter().position(|&m| m == 1.0).unwrap();
        assert_eq!(first, batch.prompt_lengths[r], "row {r}");
        assert_eq!(
            masked[masked.len() - 2..],
            [2, 198],
            "row {r} ends with <|im_end|>\\n"
        );
    }
}

#[test]
fn truncation_of_the_demo_set_is_counted() {
    let Some((tokenizer, path)) = inputs("truncation_of_the_demo_set_is_counted") else {
        return;
    };
    let config = LoadConfig {
        max_length: Some(512),
        max_prompt_length: Some(256),
        truncation: Truncation::KeepEnd,
        ..LoadConfig::default()
    };

    let data = PreferenceDataset::load(&path, &tokenizer, &config).unwrap();

    let report = data.report();
    assert_eq!(report.loaded, 300);
    assert!(
        !report.truncated.is_empty() && report.truncated.len() < 300,
        "{report}"
    );
    let batch = data
        .batch(&(0..8).collect::<Vec<_>>(), &Device::Cpu)
        .unwrap();
    assert!(batch.input_ids.dims()[1] <= 512);
    assert!(batch.prompt_lengths.iter().all(|&p| p <= 256));
}

#[test]
fn llama_factory_v1_messages_with_content_parts_load_through_column_mapping() {
    let test = "llama_factory_v1_messages_with_content_parts_load_through_column_mapping";
    let Some((tokenizer, demo)) = inputs(test) else {
        return;
    };
    let path = demo.with_file_name("v1_dpo_demo.jsonl");
    if !path.exists() {
        println!(
            "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
            path.display()
        );
        return;
    }
    let config = LoadConfig {
        columns: Columns {
            chosen: "chosen_messages".into(),
            rejected: "rejected_messages".into(),
            ..Columns::default()
        },
        ..LoadConfig::default()
    };

    let data = PreferenceDataset::load(&path, &tokenizer, &config).unwrap();

    assert_eq!(data.report().format, Some(Format::ImplicitPrompt));
    assert_eq!((data.report().records, data.len()), (10, 10));
    let prompt = tokenizer
        .decode(data.pair(0).unwrap().prompt, false)
        .unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\nYou are an AI assistant."),
        "{prompt}"
    );
    assert!(
        prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt}"
    );
}

/// Wall time of reading, tokenizing and batching all 300 pairs (printed; run with
/// `--nocapture`): the best of three runs, since the machine may be shared. Dev profile:
/// our code at opt-level 1, dependencies (tokenizers) at 3.
#[test]
fn tokenizing_and_batching_300_pairs_is_fast() {
    let Some((tokenizer, path)) = inputs("tokenizing_and_batching_300_pairs_is_fast") else {
        return;
    };
    let config = BatchConfig {
        batch_size: 8,
        group_by_length: true,
        ..BatchConfig::default()
    };

    let mut best = (f64::INFINITY, f64::INFINITY);
    let mut best_cpu = f64::INFINITY;
    let mut padded = 0;
    let mut stored = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let cpu_start = process_cpu_seconds();
        let data = PreferenceDataset::load(&path, &tokenizer, &LoadConfig::default()).unwrap();
        let loaded = start.elapsed().as_secs_f64();
        let mut sampler = data.sampler((0..data.len()).collect(), &config).unwrap();
        padded = 0;
        for _ in 0..sampler.batches_per_epoch() {
            let (_, indices) = sampler.next_batch();
            let batch = data.batch(&indices, &Device::Cpu).unwrap();
            padded += batch.input_ids.elem_count();
        }
        let total = start.elapsed().as_secs_f64();
        if let (Some(before), Some(after)) = (cpu_start, process_cpu_seconds()) {
            best_cpu = best_cpu.min(after - before);
        }
        stored = data.report().tokens;
        best = (best.0.min(loaded), best.1.min(total));
    }

    println!(
        "dpo_en_demo: 300 pairs, {stored} tokens stored, {padded} padded batch tokens; \
         best of 3: load+tokenize {:.0} ms, load+tokenize+batch {:.0} ms wall, {:.0} ms CPU",
        best.0 * 1e3,
        best.1 * 1e3,
        best_cpu * 1e3
    );
    assert!(best.1 < 30.0, "took {:.1} s", best.1);
}

#[test]
fn the_chinese_demo_set_loads_and_round_trips_through_decoding() {
    let test = "the_chinese_demo_set_loads_and_round_trips_through_decoding";
    let Some((tokenizer, demo)) = inputs(test) else {
        return;
    };
    let path = demo.with_file_name("dpo_zh_demo.json");
    if !path.exists() {
        println!(
            "SKIPPED {test}: asset {} absent (run scripts/fetch-assets.sh)",
            path.display()
        );
        return;
    }

    let data = PreferenceDataset::load(&path, &tokenizer, &LoadConfig::default()).unwrap();

    assert_eq!(data.report().loaded, data.report().records);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let chosen = raw[0]["chosen"]["value"].as_str().unwrap();
    let decoded = tokenizer
        .decode(data.pair(0).unwrap().chosen, false)
        .unwrap();
    assert_eq!(decoded, format!("{chosen}<|im_end|>\n"));
}

/// CPU time (user + system, all threads) of this process so far, from /proc (Linux only),
/// so that the benchmark can be read on a machine other jobs share.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
