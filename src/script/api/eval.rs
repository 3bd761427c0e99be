//! Script functions for evaluation: AlpacaEval answer files, held-out preference accuracy and
//! robustness to sampling temperature (tables and plots).

use std::cell::Ref;
use std::path::Path;
use std::rc::Rc;

use candle_core::DType;
use rhai::{Array, Dynamic, EvalAltResult, Map};

use super::data::{indices_of, DatasetHandle};
use super::model::{ModelHandle, ModelState};
use super::tensor::as_f64;
use crate::data::{LoadConfig, PreferenceDataset};
use crate::eval::robustness::tables_text;
use crate::eval::{
    self, AlpacaConfig, PreferenceEvalConfig, Progress, RobustnessConfig, RobustnessTable, Subset,
};
use crate::model::{CausalLm, GenerateOptions, LoadOptions, Loaded};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;
use crate::tokenize::Tokenizer;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

fn opt_f64(opts: &Map, key: &str, default: f64) -> RResult<f64> {
    match opts.get(key) {
        Some(v) => as_f64(v).ok_or_else(|| script_err(format!("option `{key}` must be a number"))),
        None => Ok(default),
    }
}

fn opt_usize(opts: &Map, key: &str, default: usize) -> RResult<usize> {
    let v = opt_f64(opts, key, default as f64)?;
    if v < 0.0 {
        return Err(script_err(format!(
            "option `{key}` must not be negative, got {v}"
        )));
    }
    Ok(v as usize)
}

/// An optional positive number: absent, `()` or 0 mean "off".
fn opt_positive(opts: &Map, key: &str) -> RResult<Option<f64>> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(_) => Ok(Some(opt_f64(opts, key, 0.0)?).filter(|v| *v > 0.0)),
    }
}

fn opt_string(opts: &Map, key: &str) -> Option<String> {
    opts.get(key)
        .filter(|v| !v.is_unit())
        .map(|v| v.to_string())
}

fn required(opts: &Map, key: &str, function: &str) -> RResult<String> {
    opt_string(opts, key).ok_or_else(|| script_err(format!("{function}: option `{key}` is needed")))
}

/// A model argument: a path loaded for this call, or a script's model handle.
enum ModelArg {
    /// Loaded from a folder, a `.gguf` file or a hub id, frozen, with its tokenizer if found.
    Loaded(Box<Loaded>),
    /// A model the script already holds (`load_model(...)`).
    Handle(ModelHandle),
}

impl ModelArg {
    /// The model under `key` of `opts`: a path string or a model handle; `None` when absent.
    fn from_opts(ctx: &HostContext, opts: &Map, key: &str) -> RResult<Option<ModelArg>> {
        let Some(value) = opts.get(key).filter(|v| !v.is_unit()) else {
            return Ok(None);
        };
        if let Some(handle) = value.clone().try_cast::<ModelHandle>() {
            return Ok(Some(ModelArg::Handle(handle)));
        }
        if !value.is_string() {
            return Err(script_err(format!(
                "option `{key}` must be a model path or a model, got {}",
                value.type_name()
            )));
        }

        let load = LoadOptions {
            dtype: DType::F32,
            device: ctx.options.device.clone(),
            trainable: false,
        };
        let loaded = CausalLm::load(&value.to_string(), &load).map_err(script_err)?;
        Ok(Some(ModelArg::Loaded(Box::new(loaded))))
    }

    fn required(ctx: &HostContext, opts: &Map, key: &str, function: &str) -> RResult<ModelArg> {
        Self::from_opts(ctx, opts, key)?
            .ok_or_else(|| script_err(format!("{function}: option `{key}` is needed")))
    }

    /// The model and its tokenizer; a handle stays borrowed through `guard`.
    fn view<'a: 'g, 'g>(
        &'a self,
        guard: &'g mut Option<Ref<'a, ModelState>>,
    ) -> (&'g CausalLm, Option<&'g Tokenizer>) {
        match self {
            ModelArg::Loaded(loaded) => (&loaded.model, loaded.tokenizer.as_ref()),
            ModelArg::Handle(handle) => {
                let state: &'g Ref<'a, ModelState> = guard.insert(handle.0.borrow());
                (&state.model, state.tokenizer.as_ref().map(|t| t.0.as_ref()))
            }
        }
    }
}

fn need_tokenizer<'a>(tokenizer: Option<&'a Tokenizer>, function: &str) -> RResult<&'a Tokenizer> {
    tokenizer.ok_or_else(|| {
        script_err(format!(
            "{function}: the model has no tokenizer; give a model with one, or \
             m.set_tokenizer(load_tokenizer(path))"
        ))
    })
}

/// Runs `work` with a progress bar on the host's sink.
fn with_bar<T>(
    ctx: &HostContext,
    label: &str,
    work: impl FnOnce(&mut dyn FnMut(&Progress)) -> T,
) -> T {
    let id = ctx.progress_id();
    let mut started = false;
    let mut last = 0usize;
    let result = work(&mut |p: &Progress| {
        let sink = ctx.progress.borrow();
        if !started {
            sink.start(id, p.total as u64, label);
            started = true;
        }
        sink.advance(id, p.done.saturating_sub(last) as u64, &p.label);
        last = p.done;
    });
    ctx.progress.borrow().finish(id);
    result
}

fn to_map(value: &impl serde::Serialize) -> RResult<Dynamic> {
    rhai::serde::to_dynamic(value)
}

fn tables_of(tables: &Array) -> RResult<Vec<RobustnessTable>> {
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            rhai::serde::from_dynamic::<RobustnessTable>(t)
                .map_err(|e| script_err(format!("tables[{i}] is not a robustness table: {e}")))
        })
        .collect()
}

/// Registers the evaluation functions.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.category("eval");

    let c = ctx.clone();
    api.func(
        "alpaca_answers",
        "alpaca_answers(opts) -> map",
        "Answers AlpacaEval instructions and writes the alpaca_eval file (resumable); opts: \
         model (path or model), instructions, out, generator, n (0 = all), sample_seed, \
         batch_size, temperature, top_p, top_k, max_new_tokens, seed, system.",
        "let r = alpaca_answers(#{model: \"assets/m.gguf\", \
         instructions: \"assets/alpaca_eval/outputs.json\",\n    out: \"answers.json\", \
         generator: \"smollm2\", n: 20, max_new_tokens: 256});\nprint(r.generated);",
        move |opts: Map| -> RResult<Dynamic> {
            let model = ModelArg::required(&c, &opts, "model", "alpaca_answers")?;
            let instructions = required(&opts, "instructions", "alpaca_answers")?;
            let out = c
                .writable(&opt_string(&opts, "out").unwrap_or("alpaca_answers.json".into()))
                .map_err(script_err)?;
            let n = opt_usize(&opts, "n", 0)?;
            let subset = match (n, opts.get("sample_seed").filter(|v| !v.is_unit())) {
                (0, _) => Subset::All,
                (n, None) => Subset::First(n),
                (n, Some(_)) => Subset::Sample {
                    n,
                    seed: opt_usize(&opts, "sample_seed", 0)? as u64,
                },
            };
            let cfg = AlpacaConfig {
                generator: opt_string(&opts, "generator").unwrap_or("ganpo".into()),
                batch_size: opt_usize(&opts, "batch_size", 8)?,
                generate: GenerateOptions {
                    max_new_tokens: opt_usize(&opts, "max_new_tokens", 512)?,
                    temperature: opt_f64(&opts, "temperature", 0.0)?,
                    top_p: opt_positive(&opts, "top_p")?,
                    top_k: opt_positive(&opts, "top_k")?.map(|k| k as usize),
                    seed: opt_usize(&opts, "seed", c.options.seed as usize)? as u64,
                    ..GenerateOptions::default()
                },
                subset,
                system: opt_string(&opts, "system"),
            };

            let items = eval::read_alpaca_file(Path::new(&instructions)).map_err(script_err)?;
            let mut guard = None;
            let (model, tokenizer) = model.view(&mut guard);
            let tokenizer = need_tokenizer(tokenizer, "alpaca_answers")?;
            let report = with_bar(&c, "alpaca", |progress| {
                eval::generate_alpaca_answers(model, tokenizer, &items, &out, &cfg, progress)
            })
            .map_err(script_err)?;
            to_map(&report)
        },
    );

    let c = ctx.clone();
    api.func(
        "preference_eval",
        "preference_eval(opts) -> map",
        "Held-out implicit-reward accuracy and margins (DPO with a reference, SimPO) and the \
         policy's log-prob accuracy; opts: model, reference (paths or \
         models), data, limit, max_length (tokens a row keeps, default 512, 0 = all), beta, \
         simpo_beta, batch_size. Returns TRL metric names.",
        "let m = preference_eval(#{model: \"out/policy\", reference: \"assets/m.gguf\",\n    \
         data: \"assets/data/dpo_en_demo.json\", limit: 32});\n\
         print(m[\"rewards/accuracies\"]);",
        move |opts: Map| -> RResult<Dynamic> {
            let policy = ModelArg::required(&c, &opts, "model", "preference_eval")?;
            let data = required(&opts, "data", "preference_eval")?;
            let limit = opt_usize(&opts, "limit", 0)?;
            let cfg = PreferenceEvalConfig {
                beta: opt_f64(&opts, "beta", 0.1)?,
                simpo_beta: opt_f64(&opts, "simpo_beta", 2.0)?,
                batch_size: opt_usize(&opts, "batch_size", 4)?,
                limit: (limit > 0).then_some(limit),
                indices: None,
            };

            let reference = ModelArg::from_opts(&c, &opts, "reference")?;
            let (mut guard, mut ref_guard) = (None, None);
            let (policy, tokenizer) = policy.view(&mut guard);
            let tokenizer = need_tokenizer(tokenizer, "preference_eval")?;
            let reference = reference.as_ref().map(|r| r.view(&mut ref_guard).0);
            let max_length = opt_usize(&opts, "max_length", 512)?;
            let load = LoadConfig {
                limit: cfg.limit,
                max_length: (max_length > 0).then_some(max_length),
                ..LoadConfig::default()
            };
            let dataset =
                PreferenceDataset::load(Path::new(&data), tokenizer, &load).map_err(script_err)?;
            let report = with_bar(&c, "preference eval", |progress| {
                eval::evaluate_preferences(policy, reference, &dataset, &cfg, progress)
            })
            .map_err(script_err)?;
            let metrics: Map = report
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.into(), Dynamic::from_float(v)))
                .collect();
            Ok(metrics.into())
        },
    );

    let c = ctx.clone();
    api.func(
        "evaluate",
        "pairs.evaluate(policy, reference, indices, opts) -> map",
        "Held-out implicit rewards of the pairs at indices (a split), without a gradient: \
         TRL's `rewards/accuracies`, `rewards/margins`, ..., SimPO's `simpo/rewards/...`, \
         `logps/accuracies` (the policy's own preference), and for short `reward_accuracy`, \
         `reward_margin`, `logp_accuracy` and `margins` (each pair's DPO reward margin, \
         chosen minus rejected). opts: beta (0.1), simpo_beta (2.0), batch_size (4).",
        "let parts = pairs.split(0.1);\n\
         let m = pairs.evaluate(policy, reference, parts[1], #{beta: 0.1, batch_size: 2});\n\
         print(`held-out accuracy ${m.reward_accuracy}, margin ${m.reward_margin}`);",
        move |pairs: &mut DatasetHandle,
              policy: ModelHandle,
              reference: ModelHandle,
              indices: Array,
              opts: Map|
              -> RResult<Map> {
            c.interruption_point()?;
            let cfg = PreferenceEvalConfig {
                beta: opt_f64(&opts, "beta", 0.1)?,
                simpo_beta: opt_f64(&opts, "simpo_beta", 2.0)?,
                batch_size: opt_usize(&opts, "batch_size", 4)?,
                limit: None,
                indices: Some(indices_of(&indices, pairs.0.len())?),
            };
            let (policy, reference) = (policy.0.borrow(), reference.0.borrow());
            let report = with_bar(&c, "held-out eval", |progress| {
                eval::evaluate_preferences(
                    &policy.model,
                    Some(&reference.model),
                    &pairs.0,
                    &cfg,
                    progress,
                )
            })
            .map_err(script_err)?;
            let mut out: Map = report
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.into(), Dynamic::from_float(v)))
                .collect();
            let dpo = report.dpo.expect("evaluated with a reference");
            out.insert("reward_accuracy".into(), Dynamic::from_float(dpo.accuracy));
            out.insert("reward_margin".into(), Dynamic::from_float(dpo.margin));
            out.insert(
                "logp_accuracy".into(),
                Dynamic::from_float(report.policy_logps.accuracy),
            );
            let margins: Array = report
                .margins
                .into_iter()
                .map(Dynamic::from_float)
                .collect();
            out.insert("margins".into(), margins.into());
            Ok(out)
        },
    );

    let c = ctx.clone();
    api.func(
        "robustness",
        "robustness(opts) -> map",
        "Samples answers at several temperatures and measures length, distinct-1/2, repeated \
         4-grams, EOS rate and mean log-prob under a reference; opts: model, name, reference \
         (paths or models; default reference: the model), prompts (array), temperatures, \
         max_new_tokens, top_p, top_k, seed, batch_size, system.",
        "let t = robustness(#{model: \"assets/m.gguf\", name: \"base\", \
         prompts: [\"Name a fruit.\"],\n    temperatures: [0.7, 1.0, 1.5], \
         max_new_tokens: 64});\nprint(robustness_text([t]));",
        move |opts: Map| -> RResult<Dynamic> {
            let model = ModelArg::required(&c, &opts, "model", "robustness")?;
            let name = opt_string(&opts, "name").unwrap_or_else(|| "model".into());
            let prompts: Vec<String> = match opts.get("prompts") {
                Some(v) => v
                    .read_lock::<Array>()
                    .ok_or_else(|| script_err("robustness: `prompts` must be an array"))?
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                None => return Err(script_err("robustness: option `prompts` is needed")),
            };
            let temperatures = match opts.get("temperatures") {
                Some(v) => super::plot::numbers(v, "temperatures")?,
                None => RobustnessConfig::default().temperatures,
            };
            let cfg = RobustnessConfig {
                temperatures,
                max_new_tokens: opt_usize(&opts, "max_new_tokens", 64)?,
                top_p: opt_positive(&opts, "top_p")?,
                top_k: opt_positive(&opts, "top_k")?.map(|k| k as usize),
                seed: opt_usize(&opts, "seed", c.options.seed as usize)? as u64,
                batch_size: opt_usize(&opts, "batch_size", 8)?,
                system: opt_string(&opts, "system"),
            };

            let reference = ModelArg::from_opts(&c, &opts, "reference")?;
            let (mut guard, mut ref_guard) = (None, None);
            let (model, tokenizer) = model.view(&mut guard);
            let tokenizer = need_tokenizer(tokenizer, "robustness")?;
            let reference = reference
                .as_ref()
                .map_or(model, |r| r.view(&mut ref_guard).0);
            let table = with_bar(&c, "robustness", |progress| {
                eval::run_robustness(&name, model, tokenizer, reference, &prompts, &cfg, progress)
            })
            .map_err(script_err)?;
            to_map(&table)
        },
    );

    api.func(
        "robustness_text",
        "robustness_text(tables) -> string",
        "Formats robustness tables (from robustness()) as one aligned text table.",
        "print(robustness_text([dpo_table, ganpo_table]));",
        |tables: Array| -> RResult<String> { Ok(tables_text(&tables_of(&tables)?)) },
    );

    let c = ctx.clone();
    api.func(
        "plot_robustness",
        "plot_robustness(path, tables) -> string",
        "Draws the robustness statistics of several models against temperature into a PNG \
         (six panels, one line per model).",
        "plot_robustness(\"robustness.png\", [dpo_table, ganpo_table]);",
        move |path: &str, tables: Array| -> RResult<String> {
            let file = c.writable(path).map_err(script_err)?;
            eval::plot_robustness(&file, &tables_of(&tables)?).map_err(script_err)?;
            Ok(file.display().to_string())
        },
    );
}
