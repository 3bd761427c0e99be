//! The fused training steps: one call runs a whole optimizer step of DPO (or any preference
//! loss) or of GANPO over a [`PreferenceBatch`], with gradient accumulation over micro-batches.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use crate::data::PreferenceBatch;
use crate::disc::{Discriminator, Pooling};
use crate::model::{CausalLm, ForwardOptions, HiddenStates};
use crate::objective::ganpo::{chosen_disc_loss, generator_loss, rejected_disc_loss};
use crate::objective::preference::scalar;
use crate::objective::{preference_loss, sequence_logps, MovingMeans, PreferenceConfig};
use crate::optim::{clip_grad_norm, GradAccumulator, Optimizer};
use crate::{Error, Result};

/// Settings of a preference-optimisation step.
#[derive(Debug, Clone)]
pub struct DpoStepConfig {
    /// The base loss (DPO sigmoid by default).
    pub preference: PreferenceConfig,
    /// Pairs per micro-batch; gradients of the micro-batches are averaged into one step
    /// (0: the whole batch at once).
    pub micro_batch_pairs: usize,
    /// Global-norm clipping of the policy's gradients (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for DpoStepConfig {
    fn default() -> Self {
        Self {
            preference: PreferenceConfig::default(),
            micro_batch_pairs: 0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// Settings of a GANPO step.
#[derive(Debug, Clone)]
pub struct GanpoStepConfig {
    /// The preference part (loss, micro-batches, clipping).
    pub base: DpoStepConfig,
    /// Adversarial weight λ of the generator term (1.0 in the paper).
    pub lambda: f64,
    /// Hidden-state index to regularise, HF convention (None: the last, the final-norm
    /// output, as the reference code does).
    pub layer: Option<usize>,
    /// Positions the discriminators pool over.
    pub pooling: Pooling,
    /// Discriminator optimizer steps per policy step (1 in the reference recipe).
    pub disc_steps: usize,
    /// Global-norm clipping of each discriminator's gradients.
    pub disc_max_grad_norm: Option<f64>,
}

impl Default for GanpoStepConfig {
    fn default() -> Self {
        Self {
            base: DpoStepConfig::default(),
            lambda: 1.0,
            layer: None,
            pooling: Pooling::All,
            disc_steps: 1,
            disc_max_grad_norm: None,
        }
    }
}

/// GANPO's adversary: the two discriminators, their optimisers and the six moving means.
pub struct Adversary {
    /// D_c: ref-chosen > policy-chosen > ref-rejected.
    pub chosen: Discriminator,
    /// D_r: ref-rejected > policy-rejected > ref-chosen.
    pub rejected: Discriminator,
    /// Optimiser of D_c.
    pub chosen_optimizer: Box<dyn Optimizer>,
    /// Optimiser of D_r.
    pub rejected_optimizer: Box<dyn Optimizer>,
    /// The moving means both losses are formed against.
    pub means: MovingMeans,
}

impl Adversary {
    /// Two discriminators with an AdamW optimiser each (GANPO's recipe: the policy's learning
    /// rate halved) and fresh moving means (momentum 0.9).
    pub fn new(
        chosen: Discriminator,
        rejected: Discriminator,
        optimizer: crate::optim::AdamWConfig,
    ) -> Result<Self> {
        let chosen_optimizer =
            Box::new(crate::optim::AdamW::new(chosen.vars(), optimizer.clone())?);
        let rejected_optimizer = Box::new(crate::optim::AdamW::new(rejected.vars(), optimizer)?);
        Ok(Self {
            chosen,
            rejected,
            chosen_optimizer,
            rejected_optimizer,
            means: MovingMeans::default(),
        })
    }

    /// Sets both discriminators' learning rate (a schedule calls this before each step).
    pub fn set_lr(&mut self, lr: f64) {
        self.chosen_optimizer.set_lr(lr);
        self.rejected_optimizer.set_lr(lr);
    }
}

/// Policy-side inputs shared by both steps.
pub struct StepInputs<'a> {
    /// The trainable policy.
    pub policy: &'a CausalLm,
    /// The frozen reference (needed unless the loss is reference-free, or its log-probs are
    /// precomputed and the step is DPO).
    pub reference: Option<&'a CausalLm>,
    /// The batch.
    pub batch: &'a PreferenceBatch,
    /// Precomputed reference log-prob sums `[2B]` in batch row order.
    pub reference_logps: Option<&'a Tensor>,
    /// The optimizer step being taken, for error messages (non-finite losses).
    pub step: usize,
}

/// Checks that every tensor of `batch` agrees in shape; returns `B` (pairs) and `T`.
pub fn check_batch(batch: &PreferenceBatch) -> Result<(usize, usize)> {
    let (rows, t) = batch.input_ids.dims2().map_err(|_| Error::ShapeMismatch {
        name: "batch.input_ids ([2B, T])".into(),
        expected: vec![2 * batch.indices.len(), 0],
        got: batch.input_ids.dims().to_vec(),
    })?;
    for (name, tensor) in [
        ("batch.attention_mask", &batch.attention_mask),
        ("batch.completion_mask", &batch.completion_mask),
    ] {
        if tensor.dims() != [rows, t] {
            return Err(Error::ShapeMismatch {
                name: format!("{name} (must match batch.input_ids)"),
                expected: vec![rows, t],
                got: tensor.dims().to_vec(),
            });
        }
    }
    if rows == 0 || rows % 2 != 0 || rows != 2 * batch.indices.len() {
        return Err(Error::ShapeMismatch {
            name: "batch.input_ids rows (2 × pairs in batch.indices)".into(),
            expected: vec![2 * batch.indices.len(), t],
            got: vec![rows, t],
        });
    }
    if batch.prompt_lengths.len() != rows {
        return Err(Error::ShapeMismatch {
            name: "batch.prompt_lengths".into(),
            expected: vec![rows],
            got: vec![batch.prompt_lengths.len()],
        });
    }
    Ok((rows / 2, t))
}

/// The micro-batches of pairs `[start, start + len)`, as row indices (chosen, then rejected).
fn micro_batches(pairs: usize, per_micro: usize) -> Vec<(usize, usize)> {
    let per = if per_micro == 0 {
        pairs
    } else {
        per_micro.min(pairs)
    };
    (0..pairs)
        .step_by(per)
        .map(|s| (s, per.min(pairs - s)))
        .collect()
}

fn select_rows(t: &Tensor, pairs: usize, start: usize, len: usize) -> Result<Tensor> {
    if start == 0 && len == pairs {
        return Ok(t.clone());
    }
    let rows: Vec<u32> = (start..start + len)
        .chain(pairs + start..pairs + start + len)
        .map(|r| r as u32)
        .collect();
    let idx = Tensor::new(rows, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

/// One micro-batch's tensors.
struct Micro {
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    reference_logps: Option<Tensor>,
    pairs: usize,
}

fn micro(inputs: &StepInputs, pairs: usize, start: usize, len: usize) -> Result<Micro> {
    let b = inputs.batch;
    let reference_logps = match inputs.reference_logps {
        Some(r) => {
            if r.dims() != [2 * pairs] {
                return Err(Error::ShapeMismatch {
                    name: "reference_logps (one per batch row)".into(),
                    expected: vec![2 * pairs],
                    got: r.dims().to_vec(),
                });
            }
            Some(select_rows(r, pairs, start, len)?)
        }
        None => None,
    };
    Ok(Micro {
        input_ids: select_rows(&b.input_ids, pairs, start, len)?,
        attention_mask: select_rows(&b.attention_mask, pairs, start, len)?,
        completion_mask: select_rows(&b.completion_mask, pairs, start, len)?,
        reference_logps,
        pairs: len,
    })
}

fn finite(step: usize, term: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::NonFinite {
            step,
            term: term.to_string(),
            value,
        })
    }
}

/// Wall-clock seconds of a step's phases, summed over micro-batches and reported as
/// `time/<phase>` metrics.
struct Phases {
    last: Instant,
    seconds: BTreeMap<&'static str, f64>,
}

impl Phases {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            seconds: BTreeMap::new(),
        }
    }

    /// Charges the time since the previous mark to `phase`.
    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        *self.seconds.entry(phase).or_insert(0.0) += (now - self.last).as_secs_f64();
        self.last = now;
    }

    fn report(self, metrics: &mut BTreeMap<String, f64>) {
        for (phase, seconds) in self.seconds {
            metrics.insert(format!("time/{phase}"), seconds);
        }
    }
}

fn add_metrics(total: &mut BTreeMap<String, f64>, m: BTreeMap<String, f64>, weight: f64) {
    for (k, v) in m {
        *total.entry(k).or_insert(0.0) += v * weight;
    }
}

/// Reference log-prob sums of a micro-batch: precomputed ones, or a no-grad forward of the
/// reference model (also returning the hidden state `layer` when asked).
fn reference_pass(
    reference: Option<&CausalLm>,
    m: &Micro,
    need_logps: bool,
    layer: Option<usize>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let need_forward = (need_logps && m.reference_logps.is_none()) || layer.is_some();
    if !need_forward {
        return Ok((m.reference_logps.clone(), None));
    }
    let reference = reference.ok_or_else(|| {
        Error::invalid("this step needs a reference model (or precomputed reference log-probs)")
    })?;
    let opts = ForwardOptions {
        logits: need_logps && m.reference_logps.is_none(),
        hidden: match layer {
            Some(l) => HiddenStates::Layers(vec![l]),
            None => HiddenStates::None,
        },
    };
    let out = reference.forward(&m.input_ids, &m.attention_mask, &opts)?;

    let logps = match (&m.reference_logps, &out.logits) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(logits)) => Some(
            sequence_logps(&logits.detach(), &m.input_ids, &m.completion_mask)?
                .sum
                .detach(),
        ),
        (None, None) => None,
    };
    let hidden = match layer {
        Some(l) => Some(
            out.hidden(l)
                .ok_or_else(|| Error::invalid(format!("no hidden state {l}")))?
                .detach(),
        ),
        None => None,
    };
    Ok((logps, hidden))
}

/// One optimizer step of a preference loss (DPO, hinge, IPO, SimPO, reference-free DPO).
///
/// For each micro-batch: policy forward with gradient, reference log-probs (precomputed or a
/// no-grad reference forward), loss, backward; the gradients are averaged, clipped, and the
/// optimizer steps once. Returns the metrics averaged over micro-batches (TRL names), plus
/// `grad_norm` (before clipping), `lr` and the wall-clock seconds of the step's phases
/// (`time/policy_forward`, `time/reference_forward`, `time/policy_backward`,
/// `time/optimizer`).
pub fn dpo_step(
    inputs: &StepInputs,
    optimizer: &mut dyn Optimizer,
    cfg: &DpoStepConfig,
) -> Result<BTreeMap<String, f64>> {
    let _span = tracing::debug_span!("dpo_step", step = inputs.step).entered();
    let (pairs, _) = check_batch(inputs.batch)?;
    let vars = inputs.policy.vars();
    let needs_reference = cfg.preference.kind.needs_reference() && !cfg.preference.reference_free;
    let chunks = micro_batches(pairs, cfg.micro_batch_pairs);

    let mut accumulator = GradAccumulator::new();
    let mut metrics = BTreeMap::new();
    let mut phases = Phases::start();
    for &(start, len) in &chunks {
        let m = micro(inputs, pairs, start, len)?;
        let weight = m.pairs as f64 / pairs as f64;

        let out =
            inputs
                .policy
                .forward(&m.input_ids, &m.attention_mask, &ForwardOptions::default())?;
        let logits = out
            .logits
            .ok_or_else(|| Error::invalid("policy returned no logits"))?;
        let policy_logps = sequence_logps(&logits, &m.input_ids, &m.completion_mask)?;
        drop(logits);
        phases.mark("policy_forward");
        let (reference_logps, _) = reference_pass(inputs.reference, &m, needs_reference, None)?;
        phases.mark("reference_forward");

        let (loss, m_metrics) =
            preference_loss(&cfg.preference, &policy_logps, reference_logps.as_ref())?;
        finite(inputs.step, "loss", scalar(&loss)?)?;
        let grads = loss.affine(weight, 0.0)?.backward()?;
        accumulator.add(&vars, &grads, 1.0)?;
        add_metrics(&mut metrics, m_metrics, weight);
        phases.mark("policy_backward");
    }

    let mut grads = accumulator.take();
    let norm = match cfg.max_grad_norm {
        Some(max) => clip_grad_norm(&vars, &mut grads, max)?,
        None => crate::optim::grad_norm(&vars, &grads)?,
    };
    finite(inputs.step, "grad_norm", norm)?;
    optimizer.step(&grads)?;
    phases.mark("optimizer");
    phases.report(&mut metrics);

    metrics.insert("grad_norm".into(), norm);
    metrics.insert("lr".into(), optimizer.lr());
    Ok(metrics)
}

/// Detached states a discriminator update needs, for one micro-batch.
struct DiscInputs {
    reference_h: Tensor,
    policy_h: Tensor,
    pool_mask: Option<Tensor>,
    pairs: usize,
}

impl DiscInputs {
    fn halves(&self, t: &Tensor, chosen: bool) -> Result<Tensor> {
        Ok(t.narrow(0, if chosen { 0 } else { self.pairs }, self.pairs)?)
    }

    /// The pooling mask of the chosen (or rejected) rows, when pooling is masked.
    fn half_mask(&self, chosen: bool) -> Result<Option<Tensor>> {
        self.pool_mask
            .as_ref()
            .map(|mask| self.halves(mask, chosen))
            .transpose()
    }

    /// One discriminator's scores on `[ref chosen; ref rejected; policy]` in one forward: the
    /// policy's chosen rows for D_c, its rejected rows for D_r.
    fn scores(&self, disc: &Discriminator, chosen: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let m = self.pairs;
        let h = Tensor::cat(
            &[&self.reference_h, &self.halves(&self.policy_h, chosen)?],
            0,
        )?;
        let mask = match (&self.pool_mask, self.half_mask(chosen)?) {
            (Some(reference), Some(policy)) => Some(Tensor::cat(&[reference, &policy], 0)?),
            _ => None,
        };
        let s = disc.forward(&h, mask.as_ref(), true)?;
        Ok((
            s.narrow(0, 0, m)?,
            s.narrow(0, m, m)?,
            s.narrow(0, 2 * m, m)?,
        ))
    }

    /// Forms both discriminator losses (updating the moving means) and backpropagates them
    /// into the discriminators' accumulators. The two discriminators share nothing, so their
    /// forwards run side by side, and so do their backwards: each fills the cores the other
    /// leaves idle in its serial stretches. Holding both graphs at once does not raise the
    /// step's peak: that comes later, in the policy's backward (`ganpo-bench` measured the
    /// same peak live heap with the updates side by side as one after the other).
    fn backward(
        &self,
        adversary: &mut Adversary,
        accumulators: &mut [GradAccumulator; 2],
        weight: f64,
        step: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let (chosen, rejected) = rayon::join(
            || self.scores(&adversary.chosen, true),
            || self.scores(&adversary.rejected, false),
        );
        let ((c_ref_w, c_ref_l, c_pol), (r_ref_w, r_ref_l, r_pol)) = (chosen?, rejected?);
        let means = &mut adversary.means;
        let (loss_pos, mut metrics) = chosen_disc_loss(means, &c_ref_w, &c_ref_l, &c_pol)?;
        let (loss_neg, m) = rejected_disc_loss(means, &r_ref_w, &r_ref_l, &r_pol)?;
        metrics.extend(m);
        finite(step, "disc_loss_pos", scalar(&loss_pos)?)?;
        finite(step, "disc_loss_neg", scalar(&loss_neg)?)?;

        let backward = |loss: &Tensor| -> Result<_> { Ok(loss.affine(weight, 0.0)?.backward()?) };
        let (pos, neg) = rayon::join(|| backward(&loss_pos), || backward(&loss_neg));
        accumulators[0].add(&adversary.chosen.vars(), &pos?, 1.0)?;
        accumulators[1].add(&adversary.rejected.vars(), &neg?, 1.0)?;
        Ok(metrics)
    }
}

/// The generator term `L_G` with both discriminators frozen, its metrics, and
/// `λ · ∂L_G/∂h` for the policy states `h` `[2m, T, d]` (chosen rows first).
///
/// The discriminators score in eval mode (no dropout, spectral norm from the stored vectors
/// without a power iteration), as the reference code's `compute_loss` runs them.
///
/// The gradient is taken through the discriminators here, on a detached copy of the states,
/// and their graph is dropped before the policy's backward.
fn generator_gradient(
    adversary: &Adversary,
    d: &DiscInputs,
    policy_h: &Tensor,
    lambda: f64,
) -> Result<(f64, BTreeMap<String, f64>, Tensor)> {
    // One half of the states (a Var of its own) and its scores, D_c on the chosen rows and
    // D_r on the rejected ones; the two run side by side.
    let (d_chosen, d_rejected, means) = (&adversary.chosen, &adversary.rejected, &adversary.means);
    let score_half = |chosen: bool| -> Result<(Var, Tensor)> {
        let h = Var::from_tensor(&d.halves(&policy_h.detach(), chosen)?)?;
        let disc = if chosen { d_chosen } else { d_rejected };
        let scores = disc.forward_frozen(h.as_tensor(), d.half_mask(chosen)?.as_ref(), false)?;
        Ok((h, scores))
    };
    let (chosen, rejected) = rayon::join(|| score_half(true), || score_half(false));
    let ((h_w, d_c), (h_l, d_r)) = (chosen?, rejected?);
    let (g_loss, metrics) = generator_loss(means, &d_c, &d_r)?;
    let value = scalar(&g_loss)?;

    // Each half's gradient comes from its own term of L_G alone, so the two backwards also
    // run side by side, each on L_G with the other discriminator's scores detached.
    let half_gradient = |chosen: bool| -> Result<Tensor> {
        let (scores_c, scores_r, h) = if chosen {
            (d_c.clone(), d_r.detach(), &h_w)
        } else {
            (d_c.detach(), d_r.clone(), &h_l)
        };
        let (loss, _) = generator_loss(means, &scores_c, &scores_r)?;
        let grads = loss.affine(lambda, 0.0)?.backward()?;
        Ok(match grads.get(h.as_tensor()) {
            Some(g) => g.detach(),
            None => h.as_tensor().zeros_like()?,
        })
    };
    let (grad_w, grad_l) = rayon::join(|| half_gradient(true), || half_gradient(false));
    let grad_h = Tensor::cat(&[grad_w?, grad_l?], 0)?;
    Ok((value, metrics, grad_h))
}

/// Steps both discriminators once from their accumulated gradients.
fn step_discriminators(
    adversary: &mut Adversary,
    accumulators: &mut [GradAccumulator; 2],
    max_norm: Option<f64>,
) -> Result<()> {
    for (i, acc) in accumulators.iter_mut().enumerate() {
        let (disc, opt) = if i == 0 {
            (&adversary.chosen, &mut adversary.chosen_optimizer)
        } else {
            (&adversary.rejected, &mut adversary.rejected_optimizer)
        };
        let mut grads = acc.take();
        if let Some(max) = max_norm {
            clip_grad_norm(&disc.vars(), &mut grads, max)?;
        }
        opt.step(&grads)?;
    }
    Ok(())
}

/// One optimizer step of GANPO: the preference loss plus λ times the generator term, with
/// the discriminators trained on the same batch.
///
/// Per micro-batch (GANPO.md's schedule): policy forward with gradient (logits and hidden
/// state `layer`) → reference forward without gradient → both discriminator losses on
/// detached states, backward (gradients accumulated; the moving means updated) → policy loss
/// `L_pref + λ·L_G` with the discriminators frozen, backward. After the last micro-batch the
/// discriminators step (`disc_steps` times: extra updates re-score the last micro-batch) and
/// then the policy steps. Metrics: the preference metrics, `dpo_loss`, `g_loss_mimic`,
/// `g_loss_mimic_rej`, `disc_loss_pos`, `disc_loss_neg`, `disc_acc_pos`, `disc_acc_neg`,
/// `loss`, `grad_norm`, `lr`, `disc_lr`, the moving means (`mean/…`) and the phases' seconds
/// (DPO's `time/…` plus `time/discriminators`, both updates and their optimizer steps, and
/// `time/generator`).
pub fn ganpo_step(
    inputs: &StepInputs,
    optimizer: &mut dyn Optimizer,
    adversary: &mut Adversary,
    cfg: &GanpoStepConfig,
) -> Result<BTreeMap<String, f64>> {
    let _span = tracing::debug_span!("ganpo_step", step = inputs.step).entered();
    let (pairs, _) = check_batch(inputs.batch)?;
    let vars = inputs.policy.vars();
    let base = &cfg.base;
    let needs_reference = base.preference.kind.needs_reference() && !base.preference.reference_free;
    let layer = cfg
        .layer
        .unwrap_or(inputs.policy.config().num_hidden_layers);
    let chunks = micro_batches(pairs, base.micro_batch_pairs);
    let opts = ForwardOptions {
        logits: true,
        hidden: HiddenStates::Layers(vec![layer]),
    };

    let mut policy_acc = GradAccumulator::new();
    let mut disc_acc = [GradAccumulator::new(), GradAccumulator::new()];
    let mut metrics = BTreeMap::new();
    let mut last_disc_inputs = None;
    let mut phases = Phases::start();
    for (i, &(start, len)) in chunks.iter().enumerate() {
        let m = micro(inputs, pairs, start, len)?;
        let weight = m.pairs as f64 / pairs as f64;

        let out = inputs
            .policy
            .forward(&m.input_ids, &m.attention_mask, &opts)?;
        let logits = out
            .logits
            .as_ref()
            .ok_or_else(|| Error::invalid("policy returned no logits"))?;
        let policy_logps = sequence_logps(logits, &m.input_ids, &m.completion_mask)?;
        let policy_h = out
            .hidden(layer)
            .ok_or_else(|| Error::invalid(format!("no hidden state {layer}")))?
            .clone();
        drop(out);
        phases.mark("policy_forward");
        let (reference_logps, reference_h) =
            reference_pass(inputs.reference, &m, needs_reference, Some(layer))?;
        let reference_h =
            reference_h.ok_or_else(|| Error::invalid("reference returned no hidden state"))?;
        phases.mark("reference_forward");

        let pool_mask = match cfg.pooling {
            Pooling::All => None,
            Pooling::Tokens => Some(m.attention_mask.clone()),
            Pooling::Completion => Some(m.completion_mask.clone()),
        };
        let disc_inputs = DiscInputs {
            reference_h,
            policy_h: policy_h.detach(),
            pool_mask,
            pairs: m.pairs,
        };
        let d_metrics = disc_inputs.backward(adversary, &mut disc_acc, weight, inputs.step)?;
        add_metrics(&mut metrics, d_metrics, weight);
        if i + 1 == chunks.len() {
            step_discriminators(adversary, &mut disc_acc, cfg.disc_max_grad_norm)?;
        }
        phases.mark("discriminators");

        let (pref_loss, p_metrics) =
            preference_loss(&base.preference, &policy_logps, reference_logps.as_ref())?;
        finite(inputs.step, "dpo_loss", scalar(&pref_loss)?)?;
        let (g_loss, g_metrics, grad_h) =
            generator_gradient(adversary, &disc_inputs, &policy_h, cfg.lambda)?;
        finite(inputs.step, "g_loss", g_loss)?;
        phases.mark("generator");
        let loss_value = finite(
            inputs.step,
            "loss",
            scalar(&pref_loss)? + cfg.lambda * g_loss,
        )?;
        // `sum(h · λ∂L_G/∂h)` has the generator term's gradient in h, so the policy's
        // backward needs no discriminator graph: the peak memory stays the DPO step's.
        let surrogate = policy_h.mul(&grad_h)?.sum_all()?;
        let grads = pref_loss.add(&surrogate)?.affine(weight, 0.0)?.backward()?;
        policy_acc.add(&vars, &grads, 1.0)?;
        phases.mark("policy_backward");

        let mut p_metrics = p_metrics;
        p_metrics.insert("dpo_loss".into(), p_metrics["loss"]);
        p_metrics.insert("loss".into(), loss_value);
        add_metrics(&mut metrics, p_metrics, weight);
        add_metrics(&mut metrics, g_metrics, weight);
        last_disc_inputs = Some(disc_inputs);
    }

    if let Some(d) = &last_disc_inputs {
        for _ in 1..cfg.disc_steps {
            d.backward(adversary, &mut disc_acc, 1.0, inputs.step)?;
            step_discriminators(adversary, &mut disc_acc, cfg.disc_max_grad_norm)?;
        }
        phases.mark("discriminators");
    }

    let mut grads = policy_acc.take();
    let norm = match base.max_grad_norm {
        Some(max) => clip_grad_norm(&vars, &mut grads, max)?,
        None => crate::optim::grad_norm(&vars, &grads)?,
    };
    finite(inputs.step, "grad_norm", norm)?;
    optimizer.step(&grads)?;
    phases.mark("optimizer");
    phases.report(&mut metrics);

    metrics.insert("grad_norm".into(), norm);
    metrics.insert("lr".into(), optimizer.lr());
    metrics.insert("disc_lr".into(), adversary.chosen_optimizer.lr());
    for (name, value) in adversary.means.named() {
        metrics.insert(format!("mean/{name}"), value);
    }
    Ok(metrics)
}

/// Reference log-prob sums `[2B]` of a batch, for precomputing once per dataset.
pub fn reference_logps(reference: &CausalLm, batch: &PreferenceBatch) -> Result<Tensor> {
    check_batch(batch)?;
    let out = reference.forward(
        &batch.input_ids,
        &batch.attention_mask,
        &ForwardOptions::default(),
    )?;
    let logits = out
        .logits
        .ok_or_else(|| Error::invalid("reference returned no logits"))?;
    Ok(
        sequence_logps(&logits.detach(), &batch.input_ids, &batch.completion_mask)?
            .sum
            .detach()
            .to_dtype(DType::F32)?,
    )
}
