//! The `Dataset`, `Batch` and `Sampler` script types: preference data loaded, split and
//! batched as the training steps consume it.

use std::cell::RefCell;
use std::rc::Rc;

use rhai::{Array, Dynamic, EvalAltResult, Map};

use super::model::{ModelHandle, TokenizerHandle};
use super::opts::Opts;
use super::tensor::TensorHandle;
use crate::data::{
    BatchConfig, BatchSampler, Columns, Format, LoadConfig, OnInvalid, PreferenceBatch,
    PreferenceDataset, Truncation,
};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// A tokenized preference dataset as a rhai value (cloning shares it).
#[derive(Clone)]
pub struct DatasetHandle(pub Rc<PreferenceDataset>);

/// A batch of 2B rows (chosen then rejected) as a rhai value.
#[derive(Clone)]
pub struct BatchHandle(pub Rc<PreferenceBatch>);

/// An epoch iterator over pair indices, resumable from its position.
#[derive(Clone)]
pub struct SamplerHandle(pub Rc<RefCell<BatchSampler>>);

pub(super) fn indices_of(value: &Array, len: usize) -> RResult<Vec<usize>> {
    value
        .iter()
        .map(|v| {
            v.as_int()
                .ok()
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < len)
                .ok_or_else(|| script_err(format!("pair index {v} is not in 0..{len}")))
        })
        .collect()
}

fn int_array(values: &[usize]) -> Array {
    values
        .iter()
        .map(|&i| Dynamic::from_int(i as i64))
        .collect()
}

fn load_config(opts: &Map) -> RResult<LoadConfig> {
    let o = Opts::new(opts, "load_preferences");
    o.only(&[
        "max_length",
        "max_prompt_length",
        "truncation",
        "format",
        "on_invalid",
        "split",
        "limit",
        "text_as_chat",
        "columns",
    ])?;
    let mut cfg = LoadConfig {
        max_length: o.opt_usize("max_length")?,
        max_prompt_length: o.opt_usize("max_prompt_length")?,
        split: o.opt_string("split")?,
        limit: o.opt_usize("limit")?,
        text_as_chat: o.bool("text_as_chat", true)?,
        ..Default::default()
    };
    if let Some(t) = o.opt_string("truncation")? {
        cfg.truncation = Truncation::from_name(&t).ok_or_else(|| {
            script_err(format!(
                "truncation must be keep_start or keep_end, got `{t}`"
            ))
        })?;
    }
    if let Some(f) = o.opt_string("format")? {
        cfg.format = Some(
            Format::from_name(&f)
                .ok_or_else(|| script_err(format!("unknown dataset format `{f}`")))?,
        );
    }
    if let Some(columns) = opts.get("columns") {
        cfg.columns = columns_of(columns)?;
    }
    cfg.on_invalid = match o.string("on_invalid", "error")?.as_str() {
        "error" => OnInvalid::Error,
        "skip" => OnInvalid::Skip,
        other => {
            return Err(script_err(format!(
                "on_invalid must be error or skip, got {other}"
            )))
        }
    };
    Ok(cfg)
}

/// `#{prompt: "question", chosen: "response_j", ...}`: the dataset's own column names.
fn columns_of(value: &Dynamic) -> RResult<Columns> {
    let map = value
        .clone()
        .try_cast::<Map>()
        .ok_or_else(|| script_err("load_preferences: `columns` must be a map of names"))?;
    let mut columns = Columns::default();
    for (key, name) in map {
        let name = name.into_string().map_err(|t| {
            script_err(format!(
                "load_preferences: columns.{key} must be a string, got {t}"
            ))
        })?;
        let slot = match key.as_str() {
            "prompt" => &mut columns.prompt,
            "chosen" => &mut columns.chosen,
            "rejected" => &mut columns.rejected,
            "conversations" => &mut columns.conversations,
            "system" => &mut columns.system,
            other => {
                return Err(script_err(format!(
                    "load_preferences: unknown column `{other}`; \
                     known: prompt, chosen, rejected, conversations, system"
                )))
            }
        };
        *slot = name;
    }
    Ok(columns)
}

fn tokenizer_of(value: &Dynamic) -> RResult<TokenizerHandle> {
    if let Some(m) = value.clone().try_cast::<ModelHandle>() {
        return m.tokenizer();
    }
    value.clone().try_cast::<TokenizerHandle>().ok_or_else(|| {
        script_err(format!(
            "expected a Model or a Tokenizer, got {}",
            value.type_name()
        ))
    })
}

/// Registers the data types and functions.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.engine()
        .register_type_with_name::<DatasetHandle>("Dataset");
    api.engine().register_type_with_name::<BatchHandle>("Batch");
    api.engine()
        .register_type_with_name::<SamplerHandle>("Sampler");
    api.category("data");

    let load = |path: &str, with: Dynamic, opts: Map| -> RResult<DatasetHandle> {
        let tok = tokenizer_of(&with)?;
        let cfg = load_config(&opts)?;
        let ds = PreferenceDataset::load(std::path::Path::new(path), &tok.0, &cfg)
            .map_err(script_err)?;
        Ok(DatasetHandle(Rc::new(ds)))
    };
    api.func(
        "load_preferences",
        "load_preferences(path, model_or_tokenizer, opts) -> Dataset",
        "Reads preference pairs (JSON, JSONL, Parquet; TRL, conversational or ShareGPT), \
         chat-formats and tokenizes them; opts: max_length, max_prompt_length, truncation, \
         format, on_invalid, split, limit, text_as_chat, columns (a map renaming prompt, chosen, \
         rejected, conversations, system to the file's own column names).",
        "let pairs = load_preferences(\"pairs.json\", policy, #{max_length: 512});",
        load,
    );
    api.overload("load_preferences", move |path: &str, with: Dynamic| {
        load(path, with, Map::new())
    });

    api.func(
        "len",
        "ds.len() -> int",
        "Number of pairs.",
        "print(pairs.len());",
        |d: &mut DatasetHandle| d.0.len() as i64,
    );
    api.func(
        "report",
        "ds.report() -> string",
        "What loading read, skipped, truncated and dropped.",
        "print(pairs.report());",
        |d: &mut DatasetHandle| d.0.report().to_string(),
    );
    let c = ctx.clone();
    api.func(
        "split",
        "ds.split(eval_fraction) -> [train, eval]",
        "Pair indices split deterministically (from --seed) into train and held-out parts.",
        "let parts = pairs.split(0.1);\nlet train = parts[0]; let held_out = parts[1];",
        move |d: &mut DatasetHandle, fraction: f64| -> RResult<Array> {
            let (train, eval) =
                d.0.train_eval_split(fraction, c.options.seed)
                    .map_err(script_err)?;
            Ok(vec![int_array(&train).into(), int_array(&eval).into()])
        },
    );
    let c = ctx.clone();
    api.func(
        "batch",
        "ds.batch(indices) -> Batch",
        "The pairs at indices as one right-padded batch of 2B rows (chosen, then rejected).",
        "let b = pairs.batch([0, 1, 2, 3]);",
        move |d: &mut DatasetHandle, indices: Array| -> RResult<BatchHandle> {
            let idx = indices_of(&indices, d.0.len())?;
            let b = d.0.batch(&idx, &c.options.device).map_err(script_err)?;
            Ok(BatchHandle(Rc::new(b)))
        },
    );
    let c = ctx.clone();
    api.func(
        "sampler",
        "ds.sampler(indices, #{batch_size, shuffle, group_by_length, drop_last}) -> Sampler",
        "Epochs of batches over the given pairs, shuffled from --seed, resumable.",
        "let s = pairs.sampler(train, #{batch_size: 2});\nlet idx = s.next();",
        move |d: &mut DatasetHandle, indices: Array, opts: Map| -> RResult<SamplerHandle> {
            let o = Opts::new(&opts, "sampler");
            o.only(&["batch_size", "shuffle", "group_by_length", "drop_last"])?;
            let cfg = BatchConfig {
                batch_size: o.usize("batch_size", 4)?,
                shuffle: o.bool("shuffle", true)?,
                seed: c.options.seed,
                group_by_length: o.bool("group_by_length", false)?,
                drop_last: o.bool("drop_last", false)?,
            };
            let idx = indices_of(&indices, d.0.len())?;
            let s = d.0.sampler(idx, &cfg).map_err(script_err)?;
            Ok(SamplerHandle(Rc::new(RefCell::new(s))))
        },
    );
    let c = ctx.clone();
    api.func(
        "next",
        "sampler.next() -> array",
        "The pair indices of the next batch (epochs roll over).",
        "let b = pairs.batch(s.next());",
        move |s: &mut SamplerHandle| -> RResult<Array> {
            c.interruption_point()?;
            Ok(int_array(&s.0.borrow_mut().next_batch().1))
        },
    );
    api.engine().register_get("epoch", |s: &mut SamplerHandle| {
        s.0.borrow().position().epoch as i64
    });
    api.doc(
        "epoch",
        "sampler.epoch -> int",
        "The epoch of the next batch.",
        "print(s.epoch);",
    );
    api.func(
        "batches_per_epoch",
        "sampler.batches_per_epoch() -> int",
        "Batches in one epoch.",
        "let steps = s.batches_per_epoch();",
        |s: &mut SamplerHandle| s.0.borrow().batches_per_epoch() as i64,
    );

    api.engine()
        .register_get("input_ids", |b: &mut BatchHandle| {
            TensorHandle(b.0.input_ids.clone())
        });
    api.doc(
        "input_ids",
        "b.input_ids -> Tensor",
        "[2B, T] u32 token ids.",
        "print(b.input_ids.shape);",
    );
    api.engine()
        .register_get("attention_mask", |b: &mut BatchHandle| {
            TensorHandle(b.0.attention_mask.clone())
        });
    api.doc(
        "attention_mask",
        "b.attention_mask -> Tensor",
        "[2B, T] f32, 1 on real tokens.",
        "let m = b.attention_mask;",
    );
    api.engine()
        .register_get("completion_mask", |b: &mut BatchHandle| {
            TensorHandle(b.0.completion_mask.clone())
        });
    api.doc(
        "completion_mask",
        "b.completion_mask -> Tensor",
        "[2B, T] f32, 1 on completion tokens.",
        "let c = b.completion_mask;",
    );
    api.engine()
        .register_get("indices", |b: &mut BatchHandle| int_array(&b.0.indices));
    api.doc(
        "indices",
        "b.indices -> array",
        "The dataset indices of the B pairs.",
        "print(b.indices);",
    );
    api.engine()
        .register_get("pairs", |b: &mut BatchHandle| b.0.indices.len() as i64);
    api.doc(
        "pairs",
        "b.pairs -> int",
        "B, the number of pairs.",
        "print(b.pairs);",
    );
}
