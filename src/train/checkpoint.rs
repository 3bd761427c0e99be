//! Checkpoints of a training run, written atomically (temporary folder, fsync, rename) and
//! restored exactly: policy (or LoRA) weights, discriminators, optimiser states, moving
//! means, the step, the data position and the dropout generators' states.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::step::Adversary;
use crate::data::BatchPosition;
use crate::fsio::{fsync, write_atomic};
use crate::model::CausalLm;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// Name of the file in a checkpoint root that names the newest checkpoint folder.
pub const LATEST: &str = "latest";
const STATE: &str = "state.json";
const FORMAT: u64 = 1;
const MEANS_GROUP: &str = "moving_means";

/// An exact random-generator state: ChaCha seed and word position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    /// The 32-byte seed.
    pub seed: [u8; 32],
    /// Words consumed so far.
    pub word_pos: u128,
}

/// Everything needed to continue a run as if it had not stopped.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: usize,
    /// Where the data iterator stands (the next batch it will produce).
    pub position: Option<BatchPosition>,
    /// The moving means by name, with their momentum.
    pub means: BTreeMap<String, f64>,
    /// Momentum of the moving means.
    pub momentum: Option<f64>,
    /// Random generators by name (`disc_chosen`, `disc_rejected`, or a caller's own).
    pub rng: BTreeMap<String, RngState>,
    /// Tensor groups by name, one safetensors file each: `policy`, `policy_optimizer`,
    /// `disc_chosen`, `disc_chosen_optimizer`, `disc_rejected`, `disc_rejected_optimizer`.
    pub groups: BTreeMap<String, Vec<(String, Tensor)>>,
    /// Anything else the caller keeps (elapsed time, script state), as JSON.
    pub extra: Value,
}

impl Checkpoint {
    /// Captures a run: the policy's trainable tensors (every weight, or only the LoRA adapters
    /// when attached), its optimiser, and the adversary when GANPO is trained.
    // TODO: LoRA dropout in the model draws from candle's device RNG, which cannot be read
    // back; a resumed run with LoRA dropout > 0 is therefore equal in distribution, not
    // bit-for-bit. Everything this module owns (discriminator dropout) is restored exactly.
    pub fn capture(
        step: usize,
        position: Option<BatchPosition>,
        policy: &CausalLm,
        policy_optimizer: &dyn Optimizer,
        adversary: Option<&Adversary>,
    ) -> Result<Self> {
        let mut ckpt = Checkpoint {
            step,
            position,
            extra: Value::Null,
            ..Default::default()
        };
        let policy_tensors = policy
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        ckpt.groups.insert("policy".into(), policy_tensors);
        ckpt.groups
            .insert("policy_optimizer".into(), policy_optimizer.state_tensors()?);

        if let Some(adv) = adversary {
            for (name, disc, opt) in [
                ("disc_chosen", &adv.chosen, &adv.chosen_optimizer),
                ("disc_rejected", &adv.rejected, &adv.rejected_optimizer),
            ] {
                ckpt.groups.insert(name.into(), disc.named_tensors()?);
                ckpt.groups
                    .insert(format!("{name}_optimizer"), opt.state_tensors()?);
                let (seed, word_pos) = disc.rng_state()?;
                ckpt.rng.insert(name.into(), RngState { seed, word_pos });
            }
            ckpt.means = adv.means.named();
            ckpt.momentum = Some(adv.means.momentum);
            // The means also travel as f64 tensors: JSON numbers may not round-trip exactly.
            let exact = ckpt
                .means
                .iter()
                .map(|(k, v)| Ok((k.clone(), Tensor::new(&[*v], &Device::Cpu)?)))
                .collect::<Result<Vec<_>>>()?;
            ckpt.groups.insert(MEANS_GROUP.into(), exact);
        }
        Ok(ckpt)
    }

    /// Puts a captured state back into a freshly built policy, optimiser and adversary.
    /// `dir` names the checkpoint in errors.
    pub fn restore(
        &self,
        dir: &Path,
        policy: &mut CausalLm,
        policy_optimizer: &mut dyn Optimizer,
        adversary: Option<&mut Adversary>,
    ) -> Result<()> {
        let device = policy.device().clone();
        policy.load_named_tensors(&on_device(self.group(dir, "policy")?, &device)?)?;
        policy_optimizer.load_state(&self.group_map(dir, "policy_optimizer", &device)?)?;

        if let Some(adv) = adversary {
            for (name, disc, opt) in [
                ("disc_chosen", &adv.chosen, &mut adv.chosen_optimizer),
                ("disc_rejected", &adv.rejected, &mut adv.rejected_optimizer),
            ] {
                let file = dir.join(format!("{name}.safetensors"));
                disc.load_named_tensors(&self.group_map(dir, name, &device)?, &file)?;
                opt.load_state(&self.group_map(dir, &format!("{name}_optimizer"), &device)?)?;
                let rng = self.rng.get(name).ok_or_else(|| {
                    Error::invalid(format!("{}: no RNG state for `{name}`", dir.display()))
                })?;
                disc.set_rng_state(rng.seed, rng.word_pos)?;
            }
            if let Some(m) = self.momentum {
                adv.means.momentum = m;
            }
            let mut means = self.means.clone();
            if let Some(exact) = self.groups.get(MEANS_GROUP) {
                for (k, t) in exact {
                    means.insert(
                        k.clone(),
                        t.to_vec1::<f64>()?.first().copied().unwrap_or(0.0),
                    );
                }
            }
            adv.means.load_named(&means);
        }
        Ok(())
    }

    fn group(&self, dir: &Path, name: &str) -> Result<&[(String, Tensor)]> {
        self.groups
            .get(name)
            .map(|g| g.as_slice())
            .ok_or_else(|| Error::MissingTensor {
                name: format!("group `{name}`"),
                path: dir.to_path_buf(),
            })
    }

    fn group_map(
        &self,
        dir: &Path,
        name: &str,
        device: &Device,
    ) -> Result<BTreeMap<String, Tensor>> {
        Ok(on_device(self.group(dir, name)?, device)?
            .into_iter()
            .collect())
    }

    /// Writes the checkpoint to `root/step-{step:08}` atomically and points `root/latest` at
    /// it. Returns the folder written.
    pub fn save(&self, root: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let name = format!("step-{:08}", self.step);
        let target = root.join(&name);
        let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if let Err(err) = self.write_files(&tmp) {
            // A half-written checkpoint (a full disk, say) must not stay behind.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(err);
        }

        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        }
        std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
        write_atomic(&root.join(LATEST), name.as_bytes())?;
        fsync(root)?;
        Ok(target)
    }

    /// The checkpoint's files, written and flushed into the folder `tmp`.
    fn write_files(&self, tmp: &Path) -> Result<()> {
        for (group, tensors) in &self.groups {
            let path = tmp.join(format!("{group}.safetensors"));
            let map: HashMap<String, Tensor> = tensors
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
                .collect::<Result<_>>()?;
            crate::fsio::save_safetensors(&map, &path)?;
            fsync(&path)?;
        }
        let state_path = tmp.join(STATE);
        let text = serde_json::to_string_pretty(&self.state_json())
            .map_err(|e| Error::invalid(format!("checkpoint state: {e}")))?;
        std::fs::write(&state_path, text).map_err(|e| Error::io(&state_path, e))?;
        fsync(&state_path)?;
        fsync(tmp)
    }

    /// The newest complete checkpoint under `root`, if any.
    pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
        let pointer = root.join(LATEST);
        if !pointer.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&pointer).map_err(|e| Error::io(&pointer, e))?;
        let dir = root.join(name.trim());
        Ok(dir.join(STATE).exists().then_some(dir))
    }

    /// Reads a checkpoint folder written by [`Checkpoint::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let state_path = dir.join(STATE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
            path: state_path.clone(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        let bad = |msg: &str| Error::Parse {
            path: state_path.clone(),
            line: None,
            msg: msg.to_string(),
        };
        if state["format"].as_u64() != Some(FORMAT) {
            return Err(bad("unknown checkpoint format (expected 1)"));
        }

        let mut ckpt = Checkpoint {
            step: state["step"]
                .as_u64()
                .ok_or_else(|| bad("missing `step`"))? as usize,
            momentum: state["momentum"].as_f64(),
            extra: state["extra"].clone(),
            ..Default::default()
        };
        if let Some(p) = state["position"].as_object() {
            let field = |k: &str| p.get(k).and_then(Value::as_u64).map(|v| v as usize);
            ckpt.position = Some(BatchPosition {
                epoch: field("epoch").ok_or_else(|| bad("bad `position.epoch`"))?,
                batch: field("batch").ok_or_else(|| bad("bad `position.batch`"))?,
            });
        }
        if let Some(means) = state["means"].as_object() {
            for (k, v) in means {
                ckpt.means
                    .insert(k.clone(), v.as_f64().ok_or_else(|| bad("bad mean"))?);
            }
        }
        if let Some(rng) = state["rng"].as_object() {
            for (k, v) in rng {
                ckpt.rng.insert(
                    k.clone(),
                    parse_rng(v).ok_or_else(|| bad("bad `rng` entry"))?,
                );
            }
        }
        for group in state["groups"]
            .as_array()
            .ok_or_else(|| bad("missing `groups`"))?
        {
            let group = group.as_str().ok_or_else(|| bad("bad group name"))?;
            let path = dir.join(format!("{group}.safetensors"));
            if !path.exists() {
                return Err(Error::io(&path, std::io::ErrorKind::NotFound.into()));
            }
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
            let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            ckpt.groups.insert(group.to_string(), tensors);
        }
        Ok(ckpt)
    }

    fn state_json(&self) -> Value {
        let rng: serde_json::Map<String, Value> = self
            .rng
            .iter()
            .map(|(k, r)| {
                let seed: String = r.seed.iter().map(|b| format!("{b:02x}")).collect();
                (
                    k.clone(),
                    json!({"seed": seed, "word_pos": r.word_pos.to_string()}),
                )
            })
            .collect();
        json!({
            "format": FORMAT,
            "step": self.step,
            "position": self.position.map(|p| json!({"epoch": p.epoch, "batch": p.batch})),
            "means": self.means,
            "momentum": self.momentum,
            "rng": rng,
            "groups": self.groups.keys().collect::<Vec<_>>(),
            "extra": self.extra,
        })
    }
}

fn parse_rng(v: &Value) -> Option<RngState> {
    let hex = v["seed"].as_str()?;
    if hex.len() != 64 {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    let word_pos = v["word_pos"].as_str()?.parse().ok()?;
    Some(RngState { seed, word_pos })
}

fn on_device(tensors: &[(String, Tensor)], device: &Device) -> Result<Vec<(String, Tensor)>> {
    tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(device)?)))
        .collect()
}
