//! `train(...)`: a whole training loop run by the host, calling the script's schedule
//! functions (learning rate, λ, discriminator steps) and callbacks once per step.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use rhai::{Dynamic, EvalAltResult, FnPtr, Map, NativeCallContext, Position};

use super::data::{DatasetHandle, SamplerHandle};
use super::model::ModelHandle;
use super::tensor::as_f64;
use super::train::{
    log_record, script_dpo_step, script_ganpo_step, AdversaryHandle, LoggerHandle, OptimizerHandle,
};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;
use crate::train::Checkpoint;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

const KEYS: [&str; 16] = [
    "steps",
    "start",
    "policy",
    "reference",
    "optimizer",
    "adversary",
    "pairs",
    "sampler",
    "options",
    "lr",
    "disc_lr",
    "lambda",
    "disc_steps",
    "logger",
    "on_step",
    "checkpoint",
];

fn get<T: Clone + 'static>(opts: &Map, key: &str) -> RResult<Option<T>> {
    match opts.get(key).filter(|v| !v.is_unit()) {
        None => Ok(None),
        Some(v) => v.clone().try_cast::<T>().map(Some).ok_or_else(|| {
            script_err(format!(
                "train: option `{key}` has the wrong type ({})",
                v.type_name()
            ))
        }),
    }
}

fn need<T: Clone + 'static>(opts: &Map, key: &str) -> RResult<T> {
    get(opts, key)?.ok_or_else(|| script_err(format!("train: option `{key}` is required")))
}

/// A schedule given as a number or a function of the step.
fn scheduled(
    ctx: &NativeCallContext,
    value: Option<&Dynamic>,
    step: i64,
) -> RResult<Option<Dynamic>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_fnptr() => {
            let f = v.clone().cast::<FnPtr>();
            f.call_within_context::<Dynamic>(ctx, (Dynamic::from_int(step),))
                .map(Some)
        }
        Some(v) => Ok(Some(v.clone())),
    }
}

/// Registers `train`.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.category("train");
    let c = ctx.clone();
    api.func(
        "train",
        "train(#{steps, policy, reference, optimizer, pairs, sampler, adversary, options, lr, \
         disc_lr, lambda, disc_steps, logger, on_step, checkpoint, start}) -> int",
        "Runs dpo_step (or ganpo_step when an adversary is given) for steps start..steps; lr, \
         disc_lr, lambda and disc_steps may be numbers or functions of the step, called every \
         step; logs to logger, calls on_step(step, metrics), checkpoints at the end and on \
         Ctrl-C. Returns the steps done.",
        "let done = train(#{steps: 100, policy: policy, reference: reference, optimizer: opt,\n\
         \x20   pairs: pairs, sampler: sampler, adversary: adv, logger: log,\n\
         \x20   lambda: |step| if step < 20 { step / 20.0 } else { 1.0 },\n\
         \x20   disc_steps: |step| if step < 10 { 3 } else { 1 },\n\
         \x20   lr: |step| 1e-6 * (1.0 - step / 100.0), checkpoint: \"checkpoints\"});",
        move |call: NativeCallContext, opts: Map| -> RResult<i64> {
            if let Some(bad) = opts.keys().find(|k| !KEYS.contains(&k.as_str())) {
                return Err(script_err(format!(
                    "train: unknown option `{bad}`; known: {}",
                    KEYS.join(", ")
                )));
            }
            c.interruption_point()?;
            let steps = opts.get("steps").and_then(|v| v.as_int().ok()).unwrap_or(0);
            let start = opts.get("start").and_then(|v| v.as_int().ok()).unwrap_or(0);
            let policy: ModelHandle = need(&opts, "policy")?;
            let reference: Dynamic = opts.get("reference").cloned().unwrap_or(Dynamic::UNIT);
            let optimizer: OptimizerHandle = need(&opts, "optimizer")?;
            let pairs: DatasetHandle = need(&opts, "pairs")?;
            let sampler: SamplerHandle = need(&opts, "sampler")?;
            let adversary: Option<AdversaryHandle> = get(&opts, "adversary")?;
            let logger: Option<LoggerHandle> = get(&opts, "logger")?;
            let on_step: Option<FnPtr> = get(&opts, "on_step")?;
            let checkpoint: Option<String> =
                get::<rhai::ImmutableString>(&opts, "checkpoint")?.map(|s| s.to_string());
            let base: Map = get(&opts, "options")?.unwrap_or_default();

            let save = |done: i64| -> RResult<()> {
                let Some(root) = &checkpoint else {
                    return Ok(());
                };
                let root = c.writable(root).map_err(script_err)?;
                let policy = policy.0.borrow();
                let opt = optimizer.inner.borrow();
                let adv = adversary.as_ref().map(|a| a.0.borrow());
                let position = Some(sampler.0.borrow().position());
                Checkpoint::capture(
                    done.max(0) as usize,
                    position,
                    &policy.model,
                    &**opt,
                    adv.as_deref(),
                )
                .and_then(|ck| ck.save(&root))
                .map(|dir| *c.last_checkpoint.borrow_mut() = Some(dir))
                .map_err(script_err)
            };

            let bar = c.progress_id();
            c.progress
                .borrow()
                .start(bar, (steps - start).max(0) as u64, "train");
            let mut done = start;
            for step in start..steps {
                let lr = scheduled(&call, opts.get("lr"), step)?.and_then(|v| as_f64(&v));
                if let Some(lr) = lr {
                    optimizer.inner.borrow_mut().set_lr(lr);
                }
                let mut step_opts = base.clone();
                step_opts.insert("step".into(), Dynamic::from_int(step));
                let indices = sampler.0.borrow_mut().next_batch().1;
                let batch = pairs
                    .0
                    .batch(&indices, &c.options.device)
                    .map_err(script_err)?;
                let batch = super::data::BatchHandle(Rc::new(batch));

                let mut metrics = match &adversary {
                    None => script_dpo_step(
                        policy.clone(),
                        reference.clone(),
                        batch,
                        optimizer.clone(),
                        step_opts,
                    )?,
                    Some(adv) => {
                        let disc_lr = scheduled(&call, opts.get("disc_lr"), step)?
                            .and_then(|v| as_f64(&v))
                            .or(lr.map(|l| l / 2.0));
                        if let Some(disc_lr) = disc_lr {
                            adv.0.borrow_mut().set_lr(disc_lr);
                        }
                        for key in ["lambda", "disc_steps"] {
                            if let Some(v) = scheduled(&call, opts.get(key), step)? {
                                step_opts.insert(key.into(), v);
                            }
                        }
                        let (lambda, k) = (
                            step_opts.get("lambda").cloned(),
                            step_opts.get("disc_steps").cloned(),
                        );
                        let mut m = script_ganpo_step(
                            policy.clone(),
                            reference.clone(),
                            batch,
                            optimizer.clone(),
                            adv.clone(),
                            step_opts,
                        )?;
                        m.insert("lambda".into(), lambda.unwrap_or(Dynamic::from_float(1.0)));
                        m.insert("disc_steps".into(), k.unwrap_or(Dynamic::from_int(1)));
                        m
                    }
                };
                metrics.insert(
                    "epoch".into(),
                    Dynamic::from_int(sampler.0.borrow().position().epoch as i64),
                );
                if let Some(log) = &logger {
                    log_record(log, step, &metrics)?;
                }
                let loss = metrics.get("loss").and_then(as_f64).unwrap_or(f64::NAN);
                if let Some(f) = &on_step {
                    let _ = f.call_within_context::<Dynamic>(
                        &call,
                        (Dynamic::from_int(step), metrics),
                    )?;
                }
                done = step + 1;
                c.progress
                    .borrow()
                    .advance(bar, 1, &format!("loss {loss:.4}"));

                if c.interrupt.load(Ordering::Relaxed) {
                    c.progress.borrow().finish(bar);
                    save(done)?;
                    return Err(Box::new(EvalAltResult::ErrorTerminated(
                        Dynamic::from(format!("interrupted after step {done}")),
                        Position::NONE,
                    )));
                }
            }
            c.progress.borrow().finish(bar);
            save(done)?;
            Ok(done - start)
        },
    );
}
