//! Training from scripts: optimisers, schedules, discriminators, losses, backward, the fused
//! `dpo_step` / `ganpo_step`, and the metrics log.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::rc::Rc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rhai::{Array, Dynamic, EvalAltResult, Map};

use super::data::BatchHandle;
use super::model::ModelHandle;
use super::opts::Opts;
use super::tensor::TensorHandle;
use crate::disc::{Discriminator, MlpDiscConfig, Pooling, TransformerDiscConfig};
use crate::objective::SequenceLogps;
use crate::objective::{preference_loss, MovingMeans, PreferenceConfig, PreferenceLossKind};
use crate::optim::{
    clip_grad_norm, AdamW, AdamWConfig, Optimizer, Schedule, ScheduleKind, Sgd, SgdConfig, Warmup,
};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;
use crate::train::{
    dpo_step, ganpo_step, reference_logps, Adversary, DpoStepConfig, GanpoStepConfig, StepInputs,
};

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// An optimiser as a rhai value, with the parameters it updates.
#[derive(Clone)]
pub struct OptimizerHandle {
    /// The optimiser.
    pub inner: Rc<RefCell<Box<dyn Optimizer>>>,
    /// Its parameters (for clipping and gradient norms).
    pub vars: Rc<Vec<(String, Var)>>,
}

/// A learning-rate schedule as a rhai value.
#[derive(Clone)]
pub struct ScheduleHandle(pub Rc<Schedule>);

/// A discriminator as a rhai value.
#[derive(Clone)]
pub struct DiscHandle(pub Rc<Discriminator>);

/// GANPO's adversary (two discriminators, their optimisers, the moving means).
#[derive(Clone)]
pub struct AdversaryHandle(pub Rc<RefCell<Adversary>>);

/// Gradients from `backward(loss)`.
#[derive(Clone)]
pub struct GradsHandle(pub Rc<RefCell<GradStore>>);

/// Appends one JSON object per line to `metrics.jsonl`, keeping the series for plots.
#[derive(Clone)]
pub struct LoggerHandle(pub Rc<RefCell<MetricsLog>>);

/// The state behind [`LoggerHandle`].
pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
    series: BTreeMap<String, Vec<f64>>,
    started: std::time::Instant,
    offset: f64,
}

/// Opens a metrics log: a fresh file, or after a resume the old lines up to `resume_step`
/// (those written after the checkpoint by the interrupted run are dropped).
fn open_logger(path: &std::path::Path, resume_step: Option<usize>) -> RResult<LoggerHandle> {
    let io = |e: std::io::Error| script_err(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut kept = Vec::new();
    if let (Some(last), true) = (resume_step, path.exists()) {
        for (i, line) in std::fs::read_to_string(path)
            .map_err(io)?
            .lines()
            .enumerate()
        {
            let record: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| script_err(format!("{}:{}: {e}", path.display(), i + 1)))?;
            if record["step"].as_u64().is_some_and(|s| s as usize <= last) {
                kept.push(record);
            }
        }
    }

    let mut file = std::fs::File::create(path).map_err(io)?;
    let mut series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut offset = 0.0;
    for record in &kept {
        writeln!(file, "{record}").map_err(io)?;
        for (k, v) in record.as_object().into_iter().flatten() {
            if let (Some(x), false) = (v.as_f64(), k == "step" || k == "elapsed_s") {
                series.entry(k.clone()).or_default().push(x);
            }
        }
        offset = record["elapsed_s"].as_f64().unwrap_or(offset);
    }
    Ok(LoggerHandle(Rc::new(RefCell::new(MetricsLog {
        file,
        path: path.to_path_buf(),
        series,
        started: std::time::Instant::now(),
        offset,
    }))))
}

fn vars_of(target: &Dynamic) -> RResult<Vec<(String, Var)>> {
    if let Some(m) = target.clone().try_cast::<ModelHandle>() {
        return Ok(m.0.borrow().model.vars());
    }
    if let Some(d) = target.clone().try_cast::<DiscHandle>() {
        return Ok(d.0.vars());
    }
    Err(script_err(format!(
        "expected a Model or a Discriminator to optimise, got {}",
        target.type_name()
    )))
}

fn adamw_config(opts: &Map, func: &'static str) -> RResult<AdamWConfig> {
    let o = Opts::new(opts, func);
    o.only(&["lr", "beta1", "beta2", "eps", "weight_decay"])?;
    let d = AdamWConfig::default();
    Ok(AdamWConfig {
        lr: o.f64("lr", d.lr)?,
        beta1: o.f64("beta1", d.beta1)?,
        beta2: o.f64("beta2", d.beta2)?,
        eps: o.f64("eps", d.eps)?,
        weight_decay: o.f64("weight_decay", d.weight_decay)?,
    })
}

fn preference_config(o: &Opts) -> RResult<PreferenceConfig> {
    let d = PreferenceConfig::default();
    let kind = PreferenceLossKind::parse(&o.string("loss", "sigmoid")?).map_err(script_err)?;
    let simpo = kind == PreferenceLossKind::SimPo;
    Ok(PreferenceConfig {
        kind,
        beta: o.f64("beta", if simpo { 2.0 } else { d.beta })?,
        label_smoothing: o.f64("label_smoothing", d.label_smoothing)?,
        simpo_gamma: o.f64("simpo_gamma", if simpo { 0.5 } else { d.simpo_gamma })?,
        reference_free: o.bool("reference_free", d.reference_free)?,
    })
}

const PREFERENCE_KEYS: [&str; 5] = [
    "loss",
    "beta",
    "label_smoothing",
    "simpo_gamma",
    "reference_free",
];

fn dpo_config(o: &Opts) -> RResult<DpoStepConfig> {
    let max_norm = o.f64("max_grad_norm", 1.0)?;
    Ok(DpoStepConfig {
        preference: preference_config(o)?,
        micro_batch_pairs: o.usize("micro_batch_pairs", 0)?,
        max_grad_norm: (max_norm > 0.0).then_some(max_norm),
    })
}

fn metrics_map(metrics: BTreeMap<String, f64>) -> Map {
    metrics
        .into_iter()
        .map(|(k, v)| (k.into(), Dynamic::from_float(v)))
        .collect()
}

fn tensor_field(map: &Map, key: &str, what: &str) -> RResult<Tensor> {
    map.get(key)
        .and_then(|v| v.clone().try_cast::<TensorHandle>())
        .map(|t| t.0)
        .ok_or_else(|| script_err(format!("{what}: missing Tensor `{key}`")))
}

fn reference_of(value: &Dynamic) -> RResult<Option<ModelHandle>> {
    if value.is_unit() {
        return Ok(None);
    }
    value
        .clone()
        .try_cast::<ModelHandle>()
        .map(Some)
        .ok_or_else(|| {
            script_err(format!(
                "reference: expected a Model or (), got {}",
                value.type_name()
            ))
        })
}

fn discriminator(
    kind: &str,
    input_dim: usize,
    opts: &Map,
    seed: u64,
    ctx: &HostContext,
) -> RResult<Discriminator> {
    let o = Opts::new(opts, "discriminator");
    o.only(&[
        "d_model",
        "heads",
        "layers",
        "ffn_dim",
        "dropout",
        "max_positions",
        "spectral_norm",
        "hidden_dim",
        "seed",
        "lr",
    ])?;
    let device = &ctx.options.device;
    match kind {
        "transformer" => {
            let d = TransformerDiscConfig::new(input_dim);
            let cfg = TransformerDiscConfig {
                input_dim,
                d_model: o.usize("d_model", d.d_model)?,
                heads: o.usize("heads", d.heads)?,
                layers: o.usize("layers", d.layers)?,
                ffn_dim: o.usize("ffn_dim", d.ffn_dim)?,
                dropout: o.f64("dropout", d.dropout)?,
                max_positions: o.usize("max_positions", d.max_positions)?,
                spectral_norm: o.bool("spectral_norm", d.spectral_norm)?,
            };
            Discriminator::transformer(cfg, seed, device).map_err(script_err)
        }
        "mlp" => {
            let d = MlpDiscConfig::new(input_dim);
            let cfg = MlpDiscConfig {
                input_dim,
                hidden_dim: o.usize("hidden_dim", d.hidden_dim)?,
                hidden_layers: o.usize("layers", d.hidden_layers)?,
                dropout: o.f64("dropout", d.dropout)?,
                spectral_norm: o.bool("spectral_norm", d.spectral_norm)?,
            };
            Discriminator::mlp(cfg, seed, device).map_err(script_err)
        }
        other => Err(script_err(format!(
            "unknown discriminator `{other}`; known: transformer, mlp"
        ))),
    }
}

const STEP_KEYS: [&str; 3] = ["micro_batch_pairs", "max_grad_norm", "step"];
const GANPO_KEYS: [&str; 5] = [
    "lambda",
    "layer",
    "pooling",
    "disc_steps",
    "disc_max_grad_norm",
];

pub(crate) fn script_dpo_step(
    policy: ModelHandle,
    reference: Dynamic,
    b: BatchHandle,
    opt: OptimizerHandle,
    opts: Map,
) -> RResult<Map> {
    let o = Opts::new(&opts, "dpo_step");
    o.only(&[&PREFERENCE_KEYS[..], &STEP_KEYS[..]].concat())?;
    let cfg = dpo_config(&o)?;

    with_step_inputs(&policy, &reference, &b, o.usize("step", 0)?, |inputs| {
        let mut optimizer = opt.inner.borrow_mut();
        dpo_step(inputs, &mut **optimizer, &cfg).map_err(script_err)
    })
}

pub(crate) fn script_ganpo_step(
    policy: ModelHandle,
    reference: Dynamic,
    b: BatchHandle,
    opt: OptimizerHandle,
    adv: AdversaryHandle,
    opts: Map,
) -> RResult<Map> {
    let o = Opts::new(&opts, "ganpo_step");
    o.only(&[&PREFERENCE_KEYS[..], &STEP_KEYS[..], &GANPO_KEYS[..]].concat())?;
    let layers = policy.0.borrow().model.config().num_hidden_layers as i64;
    let layer = match o.raw("layer").and_then(|v| v.as_int().ok()) {
        Some(l) if l < 0 => Some((layers + 1 + l).max(0) as usize),
        Some(l) => Some(l as usize),
        None => None,
    };
    let disc_norm = o.f64("disc_max_grad_norm", 0.0)?;
    let cfg = GanpoStepConfig {
        base: dpo_config(&o)?,
        lambda: o.f64("lambda", 1.0)?,
        layer,
        pooling: Pooling::parse(&o.string("pooling", "all")?).map_err(script_err)?,
        disc_steps: o.usize("disc_steps", 1)?,
        disc_max_grad_norm: (disc_norm > 0.0).then_some(disc_norm),
    };

    with_step_inputs(&policy, &reference, &b, o.usize("step", 0)?, |inputs| {
        let mut optimizer = opt.inner.borrow_mut();
        let mut adversary = adv.0.borrow_mut();
        ganpo_step(inputs, &mut **optimizer, &mut adversary, &cfg).map_err(script_err)
    })
}

/// Borrows the policy and the (optional) reference for one fused step and hands `step_fn`
/// the step's inputs; returns its metrics as a script map.
fn with_step_inputs(
    policy: &ModelHandle,
    reference: &Dynamic,
    b: &BatchHandle,
    step: usize,
    step_fn: impl FnOnce(&StepInputs) -> RResult<BTreeMap<String, f64>>,
) -> RResult<Map> {
    let reference = reference_of(reference)?;
    let policy = policy.0.borrow();
    let reference_state = reference.as_ref().map(|r| r.0.borrow());
    let inputs = StepInputs {
        policy: &policy.model,
        reference: reference_state.as_ref().map(|r| &r.model),
        batch: &b.0,
        reference_logps: None,
        step,
    };
    Ok(metrics_map(step_fn(&inputs)?))
}

/// Writes one metrics line `{step, elapsed_s, ...metrics}` and extends the kept series.
pub fn log_record(l: &LoggerHandle, step: i64, metrics: &Map) -> RResult<()> {
    let mut log = l.0.borrow_mut();
    let mut record = serde_json::Map::new();
    record.insert("step".into(), step.into());
    let elapsed = log.offset + log.started.elapsed().as_secs_f64();
    record.insert("elapsed_s".into(), elapsed.into());
    for (k, v) in metrics {
        let value = serde_json::to_value(v).map_err(script_err)?;
        if let Some(x) = super::tensor::as_f64(v) {
            log.series.entry(k.to_string()).or_default().push(x);
        }
        record.insert(k.to_string(), value);
    }

    let line = serde_json::Value::Object(record).to_string();
    let path = log.path.clone();
    writeln!(log.file, "{line}").map_err(|e| script_err(format!("{}: {e}", path.display())))
}

/// Registers optimisers, schedules, discriminators, losses, steps and the metrics log.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.engine()
        .register_type_with_name::<OptimizerHandle>("Optimizer");
    api.engine()
        .register_type_with_name::<ScheduleHandle>("Schedule");
    api.engine()
        .register_type_with_name::<DiscHandle>("Discriminator");
    api.engine()
        .register_type_with_name::<AdversaryHandle>("Adversary");
    api.engine().register_type_with_name::<GradsHandle>("Grads");
    api.engine()
        .register_type_with_name::<LoggerHandle>("MetricsLogger");
    api.category("optim");

    api.func(
        "adamw",
        "adamw(model_or_disc, #{lr, beta1, beta2, eps, weight_decay}) -> Optimizer",
        "AdamW with PyTorch's semantics over the trainable parameters.",
        "let opt = adamw(policy, #{lr: 5e-7, weight_decay: 0.0});",
        |target: Dynamic, opts: Map| -> RResult<OptimizerHandle> {
            let vars = vars_of(&target)?;
            let opt =
                AdamW::new(vars.clone(), adamw_config(&opts, "adamw")?).map_err(script_err)?;
            Ok(OptimizerHandle {
                inner: Rc::new(RefCell::new(Box::new(opt))),
                vars: Rc::new(vars),
            })
        },
    );
    api.func(
        "sgd",
        "sgd(model_or_disc, #{lr, momentum, weight_decay, nesterov}) -> Optimizer",
        "SGD with PyTorch's semantics.",
        "let opt = sgd(policy, #{lr: 0.01, momentum: 0.9});",
        |target: Dynamic, opts: Map| -> RResult<OptimizerHandle> {
            let o = Opts::new(&opts, "sgd");
            o.only(&["lr", "momentum", "dampening", "weight_decay", "nesterov"])?;
            let cfg = SgdConfig {
                lr: o.f64("lr", 1e-3)?,
                momentum: o.f64("momentum", 0.0)?,
                dampening: o.f64("dampening", 0.0)?,
                weight_decay: o.f64("weight_decay", 0.0)?,
                nesterov: o.bool("nesterov", false)?,
            };
            let vars = vars_of(&target)?;
            let opt = Sgd::new(vars.clone(), cfg).map_err(script_err)?;
            Ok(OptimizerHandle {
                inner: Rc::new(RefCell::new(Box::new(opt))),
                vars: Rc::new(vars),
            })
        },
    );
    api.func(
        "set_lr",
        "opt.set_lr(lr)",
        "Sets the learning rate (call each step for a custom schedule).",
        "opt.set_lr(sched.lr_at(step));",
        |o: &mut OptimizerHandle, lr: f64| o.inner.borrow_mut().set_lr(lr),
    );
    api.engine()
        .register_get("lr", |o: &mut OptimizerHandle| o.inner.borrow().lr());
    api.doc(
        "lr",
        "opt.lr -> f64",
        "The current learning rate.",
        "print(opt.lr);",
    );
    api.engine()
        .register_get("steps", |o: &mut OptimizerHandle| {
            o.inner.borrow().step_count() as i64
        });
    api.doc(
        "steps",
        "opt.steps -> int",
        "Updates taken so far.",
        "print(opt.steps);",
    );
    api.func(
        "freeze",
        "opt.freeze(prefix, frozen) -> int",
        "Stops (or resumes) updating parameters whose name starts with prefix; returns how many.",
        "opt.freeze(\"model.embed_tokens\", true);",
        |o: &mut OptimizerHandle, prefix: &str, frozen: bool| {
            o.inner.borrow_mut().set_frozen(prefix, frozen) as i64
        },
    );
    api.func(
        "step",
        "opt.step(grads)",
        "One update from gradients of backward(loss).",
        "let g = backward(loss);\nopt.step(g);",
        |o: &mut OptimizerHandle, g: GradsHandle| -> RResult<()> {
            o.inner.borrow_mut().step(&g.0.borrow()).map_err(script_err)
        },
    );
    api.func(
        "clip",
        "opt.clip(grads, max_norm) -> f64",
        "Clips the global gradient norm of the optimiser's parameters; returns the norm before.",
        "let norm = opt.clip(g, 1.0);",
        |o: &mut OptimizerHandle, g: GradsHandle, max_norm: f64| -> RResult<f64> {
            clip_grad_norm(&o.vars, &mut g.0.borrow_mut(), max_norm).map_err(script_err)
        },
    );
    api.func(
        "backward",
        "backward(loss) -> Grads",
        "Gradients of a scalar loss with respect to every trainable tensor it depends on.",
        "let g = backward(loss);",
        |loss: TensorHandle| -> RResult<GradsHandle> {
            let g = loss.0.backward().map_err(script_err)?;
            Ok(GradsHandle(Rc::new(RefCell::new(g))))
        },
    );
    api.func(
        "schedule",
        "schedule(kind, base_lr, #{total_steps, warmup_steps, warmup_ratio}) -> Schedule",
        "constant, linear or cosine decay after a linear warm-up (transformers' schedules).",
        "let sched = schedule(\"cosine\", 1e-6, #{total_steps: 100, warmup_ratio: 0.1});",
        |kind: &str, base_lr: f64, opts: Map| -> RResult<ScheduleHandle> {
            let o = Opts::new(&opts, "schedule");
            o.only(&["total_steps", "warmup_steps", "warmup_ratio"])?;
            let warmup = match (o.opt_usize("warmup_steps")?, o.raw("warmup_ratio")) {
                (Some(s), _) => Warmup::Steps(s),
                (None, Some(_)) => Warmup::Ratio(o.f64("warmup_ratio", 0.0)?),
                (None, None) => Warmup::Steps(0),
            };
            let kind = ScheduleKind::parse(kind).map_err(script_err)?;
            let s = Schedule::new(kind, base_lr, warmup, o.usize("total_steps", 1)?)
                .map_err(script_err)?;
            Ok(ScheduleHandle(Rc::new(s)))
        },
    );
    api.func(
        "lr_at",
        "sched.lr_at(step) -> f64",
        "The learning rate of a step.",
        "opt.set_lr(sched.lr_at(step));",
        |s: &mut ScheduleHandle, step: i64| s.0.lr_at(step.max(0) as usize),
    );

    api.category("disc");
    let c = ctx.clone();
    api.func(
        "discriminator",
        "discriminator(kind, input_dim, opts) -> Discriminator",
        "A GANPO discriminator: \"transformer\" (the paper's: d_model 512, 8 heads, 2 layers) \
         or \"mlp\"; opts override sizes, dropout, spectral_norm, seed.",
        "let d = discriminator(\"mlp\", policy.config.hidden_size, #{hidden_dim: 128});",
        move |kind: &str, input_dim: i64, opts: Map| -> RResult<DiscHandle> {
            let seed = Opts::new(&opts, "discriminator").usize("seed", c.options.seed as usize)?;
            let d = discriminator(kind, input_dim.max(1) as usize, &opts, seed as u64, &c)?;
            Ok(DiscHandle(Rc::new(d)))
        },
    );
    api.func(
        "score",
        "d.score(h, mask, train) -> Tensor",
        "Scores [N] for hidden states [N, T, d]; mask [N, T] or () pools over all positions.",
        "let s = d.score(h.detach(), (), false);",
        |d: &mut DiscHandle,
         h: TensorHandle,
         mask: Dynamic,
         train: bool|
         -> RResult<TensorHandle> {
            let mask = mask.try_cast::<TensorHandle>().map(|t| t.0);
            d.0.forward(&h.0, mask.as_ref(), train)
                .map(TensorHandle)
                .map_err(script_err)
        },
    );
    let c = ctx.clone();
    api.func(
        "adversary",
        "adversary(policy, #{kind, lr, ...discriminator opts}) -> Adversary",
        "GANPO's two discriminators (D_c, D_r) with AdamW optimisers and the six moving means.",
        "let adv = adversary(policy, #{kind: \"transformer\", lr: 2.5e-7});",
        move |policy: ModelHandle, opts: Map| -> RResult<AdversaryHandle> {
            let mut disc_opts = opts.clone();
            let kind = disc_opts
                .remove("kind")
                .map(|k| k.to_string())
                .unwrap_or("transformer".into());
            let lr = Opts::new(&opts, "adversary").f64("lr", 1e-4)?;
            disc_opts.remove("lr");
            let seed = Opts::new(&opts, "adversary").usize("seed", c.options.seed as usize)? as u64;
            disc_opts.remove("seed");
            let dim = policy.0.borrow().model.config().hidden_size;
            let chosen = discriminator(&kind, dim, &disc_opts, seed, &c)?;
            let rejected = discriminator(&kind, dim, &disc_opts, seed + 1, &c)?;
            let cfg = AdamWConfig {
                lr,
                weight_decay: 0.0,
                ..Default::default()
            };
            let co = AdamW::new(chosen.vars(), cfg.clone()).map_err(script_err)?;
            let ro = AdamW::new(rejected.vars(), cfg).map_err(script_err)?;
            Ok(AdversaryHandle(Rc::new(RefCell::new(Adversary {
                chosen,
                rejected,
                chosen_optimizer: Box::new(co),
                rejected_optimizer: Box::new(ro),
                means: MovingMeans::new(0.9),
            }))))
        },
    );
    api.func(
        "set_disc_lr",
        "adv.set_disc_lr(lr)",
        "Sets both discriminators' learning rate.",
        "adv.set_disc_lr(opt.lr / 2.0);",
        |a: &mut AdversaryHandle, lr: f64| {
            let mut a = a.0.borrow_mut();
            a.chosen_optimizer.set_lr(lr);
            a.rejected_optimizer.set_lr(lr);
        },
    );
    api.func(
        "means",
        "adv.means() -> map",
        "The six moving means (c_ref_chosen, ..., r_policy_rejected).",
        "print(adv.means());",
        |a: &mut AdversaryHandle| metrics_map(a.0.borrow().means.named()),
    );

    api.category("train");
    api.func(
        "preference_loss",
        "preference_loss(logps, reference_sums, opts) -> #{loss, metrics}",
        "DPO (sigmoid), hinge, IPO or SimPO from m.logps(batch) and the reference's summed \
         log-probs (or ()); metrics carry TRL's names.",
        "let r = preference_loss(policy.logps(b), reference_logps(reference, b), #{beta: 0.1});\n\
         let g = backward(r.loss);",
        |logps: Map, reference: Dynamic, opts: Map| -> RResult<Map> {
            let o = Opts::new(&opts, "preference_loss");
            o.only(&PREFERENCE_KEYS)?;
            let cfg = preference_config(&o)?;
            let lp = SequenceLogps {
                sum: tensor_field(&logps, "sum", "logps")?,
                count: tensor_field(&logps, "count", "logps")?,
                mean_logit_sum: tensor_field(&logps, "logit_sum", "logps")?,
            };
            let reference = reference.try_cast::<TensorHandle>().map(|t| t.0);
            let (loss, metrics) =
                preference_loss(&cfg, &lp, reference.as_ref()).map_err(script_err)?;
            let mut out = Map::new();
            out.insert("loss".into(), Dynamic::from(TensorHandle(loss)));
            out.insert("metrics".into(), metrics_map(metrics).into());
            Ok(out)
        },
    );
    api.func(
        "reference_logps",
        "reference_logps(reference, batch) -> Tensor",
        "The frozen reference's summed completion log-probs [2B], without a gradient graph.",
        "let ref_lp = reference_logps(reference, b);",
        |reference: ModelHandle, b: BatchHandle| -> RResult<TensorHandle> {
            reference_logps(&reference.0.borrow().model, &b.0)
                .map(TensorHandle)
                .map_err(script_err)
        },
    );
    let (c, c2) = (ctx.clone(), ctx.clone());
    api.func(
        "dpo_step",
        "dpo_step(policy, reference, batch, optimizer, opts) -> map",
        "One fused optimiser step of a preference loss (reference may be () for SimPO); opts: \
         loss, beta, label_smoothing, simpo_gamma, reference_free, micro_batch_pairs, \
         max_grad_norm, step. Returns TRL-named metrics, grad_norm, lr and the seconds of \
         each phase (time/policy_forward, time/reference_forward, time/policy_backward, \
         time/optimizer).",
        "let m = dpo_step(policy, reference, b, opt, #{beta: 0.1, step: step});",
        move |policy: ModelHandle,
              reference: Dynamic,
              batch: BatchHandle,
              optimizer: OptimizerHandle,
              opts: Map| {
            c.interruption_point()?;
            script_dpo_step(policy, reference, batch, optimizer, opts)
        },
    );
    api.func(
        "ganpo_step",
        "ganpo_step(policy, reference, batch, optimizer, adversary, opts) -> map",
        "One fused GANPO step: discriminator updates then the policy update; opts: the \
         dpo_step ones plus lambda, layer (-1 = last), pooling (all, tokens, completion), \
         disc_steps, disc_max_grad_norm. Returns the dpo_step metrics plus dpo_loss, \
         g_loss_mimic(_rej), disc_loss_pos/neg, disc_acc_pos/neg, the moving means (mean/...), \
         time/discriminators and time/generator.",
        "let m = ganpo_step(policy, reference, b, opt, adv, #{lambda: 0.5, disc_steps: 2});",
        move |policy: ModelHandle,
              reference: Dynamic,
              batch: BatchHandle,
              optimizer: OptimizerHandle,
              adversary: AdversaryHandle,
              opts: Map| {
            c2.interruption_point()?;
            script_ganpo_step(policy, reference, batch, optimizer, adversary, opts)
        },
    );

    api.category("metrics");
    let c = ctx.clone();
    let open = move |path: &str, opts: Map| -> RResult<LoggerHandle> {
        let o = Opts::new(&opts, "metrics_logger");
        o.only(&["resume_step"])?;
        let resume = o.opt_usize("resume_step")?;
        open_logger(&c.writable(path).map_err(script_err)?, resume)
    };
    let open2 = open.clone();
    api.func(
        "metrics_logger",
        "metrics_logger(path) -> MetricsLogger; metrics_logger(path, #{resume_step})",
        "One JSON object per step in a .jsonl file under --out (step, elapsed_s, metrics); \
         a new file, or with resume_step the old lines up to that step kept.",
        "let log = metrics_logger(\"metrics.jsonl\");",
        move |path: &str| open2(path, Map::new()),
    );
    api.overload("metrics_logger", open);
    api.func(
        "log",
        "log.log(step, metrics)",
        "Writes one line {step, elapsed_s, ...metrics} and keeps each numeric series.",
        "log.log(step, m);",
        |l: &mut LoggerHandle, step: i64, metrics: Map| log_record(l, step, &metrics),
    );
    api.func(
        "series",
        "log.series(name) -> array",
        "Every value logged so far under a metric name.",
        "plot_curves(\"loss.png\", \"loss\", #{loss: log.series(\"loss\")}, #{});",
        |l: &mut LoggerHandle, name: &str| -> Array {
            l.0.borrow()
                .series
                .get(name)
                .map(|v| v.iter().map(|&x| Dynamic::from_float(x)).collect())
                .unwrap_or_default()
        },
    );
}
