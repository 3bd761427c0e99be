//! Learning tests of the fused steps on a tiny random Llama: DPO and GANPO raise the implicit
//! reward accuracy and margins on their training pairs; bad batches are rejected by shape.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use ganpo::data::PreferenceBatch;
use ganpo::disc::{Discriminator, MlpDiscConfig, Pooling, TransformerDiscConfig};
use ganpo::model::{CausalLm, Family, LoadOptions, ModelConfig};
use ganpo::objective::MovingMeans;
use ganpo::optim::{AdamW, AdamWConfig};
use ganpo::train::{dpo_step, ganpo_step, Adversary, DpoStepConfig, GanpoStepConfig, StepInputs};

fn tiny_models() -> (CausalLm, CausalLm) {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: true,
    };
    let policy = CausalLm::new_random(ModelConfig::tiny(Family::Llama), &opts, 11).unwrap();
    let reference = policy.frozen_copy().unwrap();
    (policy, reference)
}

/// Four pairs sharing prompts of 3 tokens; completions of 3 to 5 tokens, right padded to 9.
fn tiny_batch() -> PreferenceBatch {
    let d = Device::Cpu;
    let rows: Vec<(Vec<u32>, usize)> = vec![
        (vec![1, 5, 9, 20, 21, 22, 2], 3),
        (vec![1, 6, 9, 23, 24, 25, 26, 2], 3),
        (vec![1, 7, 9, 27, 28, 2], 3),
        (vec![1, 8, 9, 29, 30, 31, 32, 33, 2], 3),
        (vec![1, 5, 9, 40, 41, 42, 2], 3),
        (vec![1, 6, 9, 43, 44, 2], 3),
        (vec![1, 7, 9, 45, 46, 47, 48, 2], 3),
        (vec![1, 8, 9, 49, 50, 51, 2], 3),
    ];
    let t = 9;
    let (mut ids, mut attn, mut comp) = (vec![], vec![], vec![]);
    for (row, prompt) in &rows {
        for j in 0..t {
            ids.push(*row.get(j).unwrap_or(&0));
            attn.push(if j < row.len() { 1f32 } else { 0. });
            comp.push(if j >= *prompt && j < row.len() {
                1f32
            } else {
                0.
            });
        }
    }
    PreferenceBatch {
        input_ids: Tensor::from_vec(ids, (8, t), &d).unwrap(),
        attention_mask: Tensor::from_vec(attn, (8, t), &d).unwrap(),
        completion_mask: Tensor::from_vec(comp, (8, t), &d).unwrap(),
        prompt_lengths: vec![3; 8],
        indices: vec![0, 1, 2, 3],
    }
}

#[test]
fn dpo_steps_raise_reward_accuracy_and_margins_on_the_training_pairs() {
    let (policy, reference) = tiny_models();
    let batch = tiny_batch();
    let mut opt = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = DpoStepConfig {
        micro_batch_pairs: 2,
        ..Default::default()
    };

    let mut history: Vec<BTreeMap<String, f64>> = vec![];
    for step in 0..30 {
        let inputs = StepInputs {
            policy: &policy,
            reference: Some(&reference),
            batch: &batch,
            reference_logps: None,
            step,
        };
        history.push(dpo_step(&inputs, &mut opt, &cfg).unwrap());
    }

    let (first, last) = (&history[0], &history[29]);
    println!(
        "DPO 30 steps: margins {:.4} -> {:.4}, accuracies {} -> {}, loss {:.4} -> {:.4}",
        first["rewards/margins"],
        last["rewards/margins"],
        first["rewards/accuracies"],
        last["rewards/accuracies"],
        first["loss"],
        last["loss"]
    );
    assert!(
        first["rewards/margins"].abs() < 1e-6,
        "policy starts equal to the reference"
    );
    assert!(last["rewards/margins"] > 0.5, "{last:?}");
    assert_eq!(last["rewards/accuracies"], 1.0);
    assert!(last["loss"] < first["loss"]);
}

fn adversary(width: usize, transformer: bool) -> Adversary {
    let d = Device::Cpu;
    let make = |seed| {
        if transformer {
            let cfg = TransformerDiscConfig {
                d_model: 16,
                heads: 2,
                ffn_dim: 32,
                ..TransformerDiscConfig::new(width)
            };
            Discriminator::transformer(cfg, seed, &d).unwrap()
        } else {
            Discriminator::mlp(
                MlpDiscConfig {
                    hidden_dim: 32,
                    ..MlpDiscConfig::new(width)
                },
                seed,
                &d,
            )
            .unwrap()
        }
    };
    let (chosen, rejected) = (make(1), make(2));
    let opt = |disc: &Discriminator| -> Box<dyn ganpo::optim::Optimizer> {
        Box::new(
            AdamW::new(
                disc.vars(),
                AdamWConfig {
                    lr: 2.5e-3,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    Adversary {
        chosen_optimizer: opt(&chosen),
        rejected_optimizer: opt(&rejected),
        chosen,
        rejected,
        means: MovingMeans::default(),
    }
}

#[test]
fn ganpo_steps_raise_reward_accuracy_and_keep_discriminator_losses_finite() {
    let (policy, reference) = tiny_models();
    let batch = tiny_batch();
    let mut opt = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut adv = adversary(policy.config().hidden_size, true);
    let cfg = GanpoStepConfig {
        base: DpoStepConfig {
            micro_batch_pairs: 2,
            ..Default::default()
        },
        ..Default::default()
    };

    let mut history = vec![];
    for step in 0..30 {
        let inputs = StepInputs {
            policy: &policy,
            reference: Some(&reference),
            batch: &batch,
            reference_logps: None,
            step,
        };
        history.push(ganpo_step(&inputs, &mut opt, &mut adv, &cfg).unwrap());
    }

    let (first, last) = (&history[0], &history[29]);
    println!(
        "GANPO 30 steps: margins {:.4} -> {:.4}, accuracies {} -> {}, \
         disc_loss_pos {:.4} -> {:.4}, disc_loss_neg {:.4} -> {:.4}",
        first["rewards/margins"],
        last["rewards/margins"],
        first["rewards/accuracies"],
        last["rewards/accuracies"],
        first["disc_loss_pos"],
        last["disc_loss_pos"],
        first["disc_loss_neg"],
        last["disc_loss_neg"]
    );
    assert!(last["rewards/margins"] > 0.3, "{last:?}");
    assert_eq!(last["rewards/accuracies"], 1.0);
    for m in &history {
        for key in [
            "disc_loss_pos",
            "disc_loss_neg",
            "g_loss_mimic",
            "g_loss_mimic_rej",
        ] {
            assert!(m[key].is_finite(), "{key} = {}", m[key]);
        }
    }
}

#[test]
fn ganpo_with_completion_pooling_an_inner_layer_and_two_disc_steps_runs() {
    let (policy, reference) = tiny_models();
    let batch = tiny_batch();
    let mut opt = AdamW::new(policy.vars(), AdamWConfig::default()).unwrap();
    let mut adv = adversary(policy.config().hidden_size, false);
    let cfg = GanpoStepConfig {
        layer: Some(1),
        pooling: Pooling::Completion,
        disc_steps: 2,
        lambda: 0.5,
        ..Default::default()
    };
    let inputs = StepInputs {
        policy: &policy,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: None,
        step: 0,
    };

    let m = ganpo_step(&inputs, &mut opt, &mut adv, &cfg).unwrap();

    assert_eq!(adv.chosen_optimizer.step_count(), 2);
    assert!(m["disc_acc_pos"] >= 0.0 && m["disc_acc_pos"] <= 1.0);
    assert!(m.contains_key("mean/c_ref_chosen"));
}

#[test]
fn precomputed_reference_logps_give_the_same_step_as_a_reference_forward() {
    let (policy_a, reference) = tiny_models();
    let (policy_b, _) = tiny_models();
    let batch = tiny_batch();
    let ref_logps = ganpo::train::reference_logps(&reference, &batch).unwrap();
    let mut opt_a = AdamW::new(policy_a.vars(), AdamWConfig::default()).unwrap();
    let mut opt_b = AdamW::new(policy_b.vars(), AdamWConfig::default()).unwrap();
    let cfg = DpoStepConfig::default();

    let a = dpo_step(
        &StepInputs {
            policy: &policy_a,
            reference: Some(&reference),
            batch: &batch,
            reference_logps: None,
            step: 0,
        },
        &mut opt_a,
        &cfg,
    )
    .unwrap();
    let b = dpo_step(
        &StepInputs {
            policy: &policy_b,
            reference: None,
            batch: &batch,
            reference_logps: Some(&ref_logps),
            step: 0,
        },
        &mut opt_b,
        &cfg,
    )
    .unwrap();

    assert!((a["loss"] - b["loss"]).abs() < 1e-6);
    assert!((a["grad_norm"] - b["grad_norm"]).abs() < 1e-5);
}

#[test]
fn a_batch_with_mismatched_masks_is_an_error_naming_both_shapes() {
    let (policy, reference) = tiny_models();
    let mut batch = tiny_batch();
    batch.completion_mask = batch.completion_mask.narrow(1, 0, 7).unwrap();
    let mut opt = AdamW::new(policy.vars(), AdamWConfig::default()).unwrap();
    let inputs = StepInputs {
        policy: &policy,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: None,
        step: 3,
    };

    let msg = dpo_step(&inputs, &mut opt, &DpoStepConfig::default())
        .unwrap_err()
        .to_string();

    assert!(
        msg.contains("completion_mask") && msg.contains("[8, 9]") && msg.contains("[8, 7]"),
        "{msg}"
    );
}

#[test]
fn a_batch_whose_rows_disagree_with_its_pair_count_is_an_error() {
    let (policy, reference) = tiny_models();
    let mut batch = tiny_batch();
    batch.indices = vec![0, 1, 2];
    let mut opt = AdamW::new(policy.vars(), AdamWConfig::default()).unwrap();
    let inputs = StepInputs {
        policy: &policy,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: None,
        step: 0,
    };

    let msg = dpo_step(&inputs, &mut opt, &DpoStepConfig::default())
        .unwrap_err()
        .to_string();

    assert!(msg.contains("[6, 9]") && msg.contains("[8, 9]"), "{msg}");
}

#[test]
fn a_non_finite_loss_stops_the_step_naming_the_step_and_the_term() {
    let (policy, reference) = tiny_models();
    let batch = tiny_batch();
    let bad = Tensor::new(&[f32::NAN; 8], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(policy.vars(), AdamWConfig::default()).unwrap();
    let inputs = StepInputs {
        policy: &policy,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: Some(&bad),
        step: 17,
    };

    let msg = dpo_step(&inputs, &mut opt, &DpoStepConfig::default())
        .unwrap_err()
        .to_string();

    assert!(msg.contains("step 17") && msg.contains("`loss`"), "{msg}");
}

#[test]
fn ganpo_with_zero_lambda_updates_the_policy_exactly_like_dpo() {
    let (policy_a, reference) = tiny_models();
    let (policy_b, _) = tiny_models();
    let batch = tiny_batch();
    let mut opt_a = AdamW::new(policy_a.vars(), AdamWConfig::default()).unwrap();
    let mut opt_b = AdamW::new(policy_b.vars(), AdamWConfig::default()).unwrap();
    let mut adv = adversary(policy_b.config().hidden_size, true);
    let cfg = GanpoStepConfig {
        lambda: 0.0,
        ..Default::default()
    };
    let at = |step| StepInputs {
        policy: &policy_a,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: None,
        step,
    };

    let dpo = dpo_step(&at(0), &mut opt_a, &cfg.base).unwrap();
    let inputs = StepInputs {
        policy: &policy_b,
        ..at(0)
    };
    let ganpo = ganpo_step(&inputs, &mut opt_b, &mut adv, &cfg).unwrap();

    assert!((dpo["grad_norm"] - ganpo["grad_norm"]).abs() < 1e-9);
    assert!((dpo["loss"] - ganpo["dpo_loss"]).abs() < 1e-9);
    for ((name, a), (_, b)) in policy_a.vars().iter().zip(policy_b.vars().iter()) {
        let diff: f32 = a
            .as_tensor()
            .sub(b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

#[test]
fn simpo_needs_no_reference_model_and_learns() {
    let (policy, _) = tiny_models();
    let batch = tiny_batch();
    let mut opt = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let preference = ganpo::objective::PreferenceConfig {
        kind: ganpo::objective::PreferenceLossKind::SimPo,
        beta: 2.0,
        simpo_gamma: 0.5,
        ..Default::default()
    };
    let cfg = DpoStepConfig {
        preference,
        ..Default::default()
    };

    let mut last = BTreeMap::new();
    for step in 0..20 {
        let inputs = StepInputs {
            policy: &policy,
            reference: None,
            batch: &batch,
            reference_logps: None,
            step,
        };
        last = dpo_step(&inputs, &mut opt, &cfg).unwrap();
    }

    assert_eq!(last["rewards/accuracies"], 1.0, "{last:?}");
    assert!(last["rewards/margins"] > 0.5, "{last:?}");
}

/// `ganpo_step` takes the generator term's gradient through the discriminators on a detached
/// copy of the policy states (each discriminator on its own thread) and feeds it into the
/// policy's backward; the update must equal plain SGD on `L_pref + λ·L_G` differentiated
/// straight through the frozen discriminators in eval mode.
#[test]
fn ganpo_policy_gradient_equals_the_direct_gradient_of_the_full_loss() {
    use ganpo::model::{ForwardOptions, HiddenStates};
    use ganpo::objective::{ganpo::generator_loss, preference_loss, sequence_logps};
    use ganpo::optim::{Sgd, SgdConfig};

    let (stepped, reference) = tiny_models();
    let (direct, _) = tiny_models();
    let batch = tiny_batch();
    let lambda = 0.7;
    let sgd = SgdConfig {
        lr: 1.0,
        ..Default::default()
    };
    let mut opt = Sgd::new(stepped.vars(), sgd).unwrap();
    let mut adv = adversary(stepped.config().hidden_size, true);
    // The discriminators must not move, so that the direct gradient below sees the state the
    // step's generator term saw (the moving means and spectral vectors of its update).
    adv.chosen_optimizer.set_lr(0.0);
    adv.rejected_optimizer.set_lr(0.0);
    let cfg = GanpoStepConfig {
        lambda,
        base: DpoStepConfig {
            max_grad_norm: None,
            ..Default::default()
        },
        ..Default::default()
    };
    let inputs = StepInputs {
        policy: &stepped,
        reference: Some(&reference),
        batch: &batch,
        reference_logps: None,
        step: 0,
    };
    ganpo_step(&inputs, &mut opt, &mut adv, &cfg).unwrap();

    let layers = direct.config().num_hidden_layers;
    let opts = ForwardOptions {
        logits: true,
        hidden: HiddenStates::Layers(vec![layers]),
    };
    let out = direct
        .forward(&batch.input_ids, &batch.attention_mask, &opts)
        .unwrap();
    let logps = sequence_logps(
        out.logits.as_ref().unwrap(),
        &batch.input_ids,
        &batch.completion_mask,
    )
    .unwrap();
    let reference_logps = ganpo::train::reference_logps(&reference, &batch).unwrap();
    let (pref, _) = preference_loss(&cfg.base.preference, &logps, Some(&reference_logps)).unwrap();
    let h = out.hidden(layers).unwrap();
    let d_c = adv
        .chosen
        .forward_frozen(&h.narrow(0, 0, 4).unwrap(), None, false)
        .unwrap();
    let d_r = adv
        .rejected
        .forward_frozen(&h.narrow(0, 4, 4).unwrap(), None, false)
        .unwrap();
    let (g, _) = generator_loss(&adv.means, &d_c, &d_r).unwrap();
    let grads = pref
        .add(&g.affine(lambda, 0.0).unwrap())
        .unwrap()
        .backward()
        .unwrap();

    for ((name, after), (_, before)) in stepped.vars().iter().zip(direct.vars().iter()) {
        let step = before.as_tensor().sub(after.as_tensor()).unwrap();
        let grad = grads
            .get(before.as_tensor())
            .expect("every parameter has a gradient");
        let scale: f32 = grad.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let err: f32 = step
            .sub(grad)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            err <= 1e-5 * scale.max(1e-3),
            "{name}: update {err} off (gradient scale {scale})"
        );
    }
}
