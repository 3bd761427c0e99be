//! Checkpoints from scripts: an atomic save of everything a run needs to continue, and a
//! restore into freshly built objects that makes the resumed run equal the uninterrupted one.

use std::rc::Rc;

use rhai::{Dynamic, EvalAltResult, Map};

use super::data::SamplerHandle;
use super::model::ModelHandle;
use super::train::{AdversaryHandle, OptimizerHandle};
use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;
use crate::train::Checkpoint;

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

/// The objects a checkpoint covers, read from a script's option map.
struct Parts {
    policy: ModelHandle,
    optimizer: OptimizerHandle,
    adversary: Option<AdversaryHandle>,
    sampler: Option<SamplerHandle>,
}

fn parts(opts: &Map, func: &str) -> RResult<Parts> {
    let take = |key: &str| opts.get(key).filter(|v| !v.is_unit()).cloned();
    let need = |key: &str| {
        take(key).ok_or_else(|| script_err(format!("{func}: option `{key}` is required")))
    };
    let wrong = |key: &str, v: &Dynamic| {
        script_err(format!(
            "{func}: option `{key}` has the wrong type ({})",
            v.type_name()
        ))
    };
    if let Some(bad) = opts
        .keys()
        .find(|k| !["policy", "optimizer", "adversary", "sampler", "step"].contains(&k.as_str()))
    {
        return Err(script_err(format!(
            "{func}: unknown option `{bad}`; known: policy, optimizer, adversary, sampler, step"
        )));
    }

    let policy = need("policy")?;
    let optimizer = need("optimizer")?;
    Ok(Parts {
        policy: policy
            .clone()
            .try_cast()
            .ok_or_else(|| wrong("policy", &policy))?,
        optimizer: optimizer
            .clone()
            .try_cast()
            .ok_or_else(|| wrong("optimizer", &optimizer))?,
        adversary: match take("adversary") {
            Some(v) => Some(v.clone().try_cast().ok_or_else(|| wrong("adversary", &v))?),
            None => None,
        },
        sampler: match take("sampler") {
            Some(v) => Some(v.clone().try_cast().ok_or_else(|| wrong("sampler", &v))?),
            None => None,
        },
    })
}

/// Registers `save_checkpoint` and `load_checkpoint`.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.category("train");

    let c = ctx.clone();
    api.func(
        "save_checkpoint",
        "save_checkpoint(root, #{step, policy, optimizer, adversary, sampler}) -> string",
        "Writes root/step-N atomically (under --out): policy (or LoRA) weights, optimiser, \
         discriminators with their optimisers, moving means and RNG states, data position; \
         returns the folder.",
        "save_checkpoint(\"checkpoints\", #{step: step + 1, policy: policy, optimizer: opt, \
         adversary: adv, sampler: sampler});",
        move |root: &str, opts: Map| -> RResult<String> {
            let root = c.writable(root).map_err(script_err)?;
            let p = parts(&opts, "save_checkpoint")?;
            let step = opts
                .get("step")
                .and_then(|s| s.as_int().ok())
                .unwrap_or(0)
                .max(0);
            let position = p.sampler.as_ref().map(|s| s.0.borrow().position());

            let policy = p.policy.0.borrow();
            let optimizer = p.optimizer.inner.borrow();
            let adversary = p.adversary.as_ref().map(|a| a.0.borrow());
            let ckpt = Checkpoint::capture(
                step as usize,
                position,
                &policy.model,
                &**optimizer,
                adversary.as_deref(),
            )
            .map_err(script_err)?;
            let dir = ckpt.save(&root).map_err(script_err)?;
            *c.last_checkpoint.borrow_mut() = Some(dir.clone());
            Ok(dir.display().to_string())
        },
    );
    let c = ctx.clone();
    api.func(
        "load_checkpoint",
        "load_checkpoint(root, #{policy, optimizer, adversary, sampler}) -> int or ()",
        "Restores the newest checkpoint under root (relative to --out) into freshly built \
         objects and moves the sampler to its data position; returns the step to continue \
         from, or () if none.",
        "let start = load_checkpoint(\"checkpoints\", #{policy: policy, optimizer: opt});\n\
         if start == () { start = 0; }",
        move |root: &str, opts: Map| -> RResult<Dynamic> {
            let p = parts(&opts, "load_checkpoint")?;
            let root = c.options.out_dir.join(root);
            let Some(dir) = Checkpoint::latest(&root).map_err(script_err)? else {
                return Ok(Dynamic::UNIT);
            };
            let ckpt = Checkpoint::load(&dir).map_err(script_err)?;

            let mut policy = p.policy.0.borrow_mut();
            let mut optimizer = p.optimizer.inner.borrow_mut();
            let mut adversary = p.adversary.as_ref().map(|a| a.0.borrow_mut());
            ckpt.restore(
                &dir,
                &mut policy.model,
                &mut **optimizer,
                adversary.as_deref_mut(),
            )
            .map_err(script_err)?;
            if let (Some(sampler), Some(position)) = (&p.sampler, ckpt.position) {
                sampler.0.borrow_mut().seek(position).map_err(script_err)?;
            }
            Ok(Dynamic::from_int(ckpt.step as i64))
        },
    );
}
