//! `ganpo-bench`: the speed and memory figures of the project, each measured side by side with
//! its point of comparison in the same run and printed as a ratio.
//!
//! - training throughput: forward+backward tokens/s and peak memory of SmolLM2-135M (f32,
//!   batch 4 × 256) against PyTorch + transformers eager, when a Python with them is found;
//! - the GANPO/DPO step ratio: a full GANPO step (policy forward+backward, reference forward,
//!   both discriminator updates) against a DPO step on the same batch, time and peak memory;
//! - the scripting overhead: a rhai-driven training loop against the same loop in Rust.
//!
//! Each case runs in a child process of its own, so that its peak resident memory (VmHWM) is
//! its own. The step cases also report their peak live heap (bytes allocated and not yet
//! freed, counted by this binary's allocator): the memory the step needs, apart from the
//! freed blocks the allocator keeps for reuse, which makes the resident peak vary by a few
//! percent from run to run with the order of allocations. Usage:
//!
//! ```text
//! ganpo-bench [--model GGUF] [--data JSON] [--iters N] [--rounds N] [--python PATH]
//!             [--cases a,b,...]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use serde_json::{json, Value};

use ganpo::data::BatchSampler;
use ganpo::data::{BatchConfig, LoadConfig, PreferenceBatch, PreferenceDataset};
use ganpo::disc::{Discriminator, TransformerDiscConfig};
use ganpo::model::{CausalLm, ForwardOptions, LoadOptions};
use ganpo::objective::{sequence_logps, MovingMeans};
use ganpo::optim::{AdamW, AdamWConfig, Optimizer};
use ganpo::script::api::data::{DatasetHandle, SamplerHandle};
use ganpo::script::api::model::ModelHandle;
use ganpo::script::api::train::OptimizerHandle;
use ganpo::script::{Host, HostOptions};
use ganpo::tokenize::Tokenizer;
use ganpo::train::{dpo_step, ganpo_step, Adversary, DpoStepConfig, GanpoStepConfig, StepInputs};

/// The system allocator, counting the bytes it has handed out and not yet taken back, and
/// their high-water mark: the memory a case's tensors need, apart from the freed blocks that
/// the allocator keeps for reuse (which the resident size includes).
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(bytes: usize) {
        let live = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK_LIVE_BYTES.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(bytes: usize) {
        LIVE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are only
// updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, size);
        if !q.is_null() {
            Self::shrank(layout.size());
            Self::grew(size);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap bytes live at once in this process so far, in MiB.
fn peak_live_mb() -> f64 {
    PEAK_LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Speed and memory of ganpo, side by side with its references"
)]
struct Args {
    /// The GGUF checkpoint measured.
    #[arg(long, default_value = "assets/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,

    /// Preference pairs for the DPO/GANPO step cases.
    #[arg(long, default_value = "assets/data/dpo_en_demo.json")]
    data: PathBuf,

    /// Timed iterations per case (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,

    /// Sequences per batch in the throughput case, and pairs per batch in the step cases.
    #[arg(long, default_value_t = 4)]
    batch: usize,

    /// Tokens per sequence in the throughput case (the longest row in the step cases).
    #[arg(long, default_value_t = 256)]
    seq: usize,

    /// The Python with torch and transformers (default: $GANPO_PYTHON, then .refenv/bin/python,
    /// then python3 when it can import both).
    #[arg(long)]
    python: Option<PathBuf>,

    /// Which cases to run: train, torch (forward+backward throughput), dpo, ganpo (one step
    /// each in its own process: peak memory), steps (DPO and GANPO steps alternated in one
    /// process: a time ratio robust to other load on the machine).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "train,torch,dpo,ganpo,steps"
    )]
    cases: Vec<String>,

    /// How many times the cases run, one after the other in turn (train, torch, ..., train,
    /// torch, ...); each figure reported is the median over the rounds, so that a slow spell
    /// of the machine weighs on both sides of a ratio alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,

    /// Internal: run one case in this process and print its JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn main() -> Result<()> {
    ganpo::model::process::setup();
    let args = Args::parse();
    if let Some(case) = &args.child {
        let figures = run_case(case, &args)?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    if !args.model.exists() {
        bail!(
            "{}: the model to measure is absent (run scripts/fetch-assets.sh)",
            args.model.display()
        );
    }

    let mut rounds: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for round in 1..=args.rounds.max(1) {
        for case in &args.cases {
            eprintln!("ganpo-bench: measuring {case} (round {round}) ...");
            let figures = if case == "torch" {
                match find_python(args.python.as_deref()) {
                    Some(python) => torch_case(&python, &args)?,
                    None => {
                        eprintln!(
                            "ganpo-bench: no Python with torch and transformers; skipping torch"
                        );
                        continue;
                    }
                }
            } else {
                child_case(case, &args)?
            };
            // Each round's own figures, for the spread behind the medians printed at the end.
            eprintln!("ganpo-bench: {case} round {round}: {figures}");
            rounds.entry(case.clone()).or_default().push(figures);
        }
    }
    let results = rounds
        .into_iter()
        .map(|(case, figures)| (case, median_figures(&figures)))
        .collect();
    print_report(&results, &args);
    Ok(())
}

/// Runs `case` in a child process of this binary and parses its JSON line.
fn child_case(case: &str, args: &Args) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let output = Command::new(exe)
        .args(["--child", case])
        .arg("--model")
        .arg(&args.model)
        .arg("--data")
        .arg(&args.data)
        .args(["--iters", &args.iters.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--seq", &args.seq.to_string()])
        .output()
        .with_context(|| format!("running case {case}"))?;
    if !output.status.success() {
        bail!(
            "case {case} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    last_json_line(&output.stdout).with_context(|| format!("case {case} printed no JSON"))
}

fn last_json_line(stdout: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
}

fn run_case(case: &str, args: &Args) -> Result<Value> {
    match case {
        "train" => train_case(args),
        "dpo" | "ganpo" => step_case(case, args),
        "steps" => interleaved_case(args),
        "script" => script_case(args),
        "data" => data_case(args),
        other => {
            bail!("unknown case `{other}`; cases: train, torch, dpo, ganpo, steps, script, data")
        }
    }
}

/// Forward+backward of the policy on random tokens; loss: mean next-token log-likelihood.
fn train_case(args: &Args) -> Result<Value> {
    let model = load(&args.model, true)?.model;
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..args.batch * args.seq)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % vocab)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &Device::Cpu)?;
    let mask = Tensor::ones((args.batch, args.seq), DType::F32, &Device::Cpu)?;

    let step = || -> Result<()> {
        let out = model.forward(&ids, &mask, &ForwardOptions::default())?;
        let logits = out.logits.context("no logits")?;
        let logps = sequence_logps(&logits, &ids, &mask)?;
        let count = logps.count.sum_all()?;
        let loss = logps.sum.sum_all()?.neg()?.div(&count)?;
        loss.backward()?;
        Ok(())
    };
    let cpu_start = cpu_seconds();
    let seconds = timed(args.iters, step)?;
    let cpu = (cpu_seconds() - cpu_start) / (args.iters.max(1) + 1) as f64;
    let tokens = (args.batch * args.seq) as f64;
    Ok(json!({
        "train_tokens_per_s": tokens / seconds,
        "cpu_seconds_per_step": cpu,
        "seconds_per_step": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_live_mb": peak_live_mb(),
    }))
}

/// One full DPO or GANPO optimizer step on real preference pairs.
fn step_case(case: &str, args: &Args) -> Result<Value> {
    let loaded = load(&args.model, true)?;
    let policy = loaded.model;
    let reference = policy.frozen_copy()?;
    let tokenizer = Tokenizer::from_gguf_file(&args.model)?;
    let batch = real_batch(&args.data, &tokenizer, args.batch, args.seq)?;
    let mut optimizer = AdamW::new(
        policy.vars(),
        AdamWConfig {
            lr: 5e-7,
            ..Default::default()
        },
    )?;
    let mut adversary = (case == "ganpo")
        .then(|| adversary(policy.config().hidden_size))
        .transpose()?;

    let mut step_index = 0;
    let seconds = timed(args.iters, || {
        let inputs = StepInputs {
            policy: &policy,
            reference: Some(&reference),
            batch: &batch,
            reference_logps: None,
            step: step_index,
        };
        step_index += 1;
        match adversary.as_mut() {
            Some(adversary) => ganpo_step(
                &inputs,
                &mut optimizer,
                adversary,
                &GanpoStepConfig::default(),
            )?,
            None => dpo_step(&inputs, &mut optimizer, &DpoStepConfig::default())?,
        };
        Ok(())
    })?;
    let (rows, t) = batch.input_ids.dims2()?;
    Ok(json!({
        "seconds_per_step": seconds,
        "rows": rows,
        "tokens": t,
        "peak_rss_mb": peak_rss_mb(),
        "peak_live_mb": peak_live_mb(),
    }))
}

/// DPO and GANPO steps alternated in one process on the same batch, so that a change in the
/// machine's load between them affects both alike; reports the median seconds of each (one
/// slow step, from another process on the machine, moves a mean but not a median) and the
/// mean seconds of each phase.
fn interleaved_case(args: &Args) -> Result<Value> {
    let policy = load(&args.model, true)?.model;
    let reference = policy.frozen_copy()?;
    let tokenizer = Tokenizer::from_gguf_file(&args.model)?;
    let batch = real_batch(&args.data, &tokenizer, args.batch, args.seq)?;
    let adamw = AdamWConfig {
        lr: 5e-7,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(policy.vars(), adamw)?;
    let mut adversary = adversary(policy.config().hidden_size)?;

    let (mut dpo_s, mut ganpo_s) = (Vec::new(), Vec::new());
    // Seconds of each phase (`time/…` metrics), summed over the timed steps.
    let mut phases: BTreeMap<String, [f64; 2]> = BTreeMap::new();
    for step in 0..=args.iters.max(1) {
        let inputs = StepInputs {
            policy: &policy,
            reference: Some(&reference),
            batch: &batch,
            reference_logps: None,
            step,
        };
        let start = Instant::now();
        let dpo_metrics = dpo_step(&inputs, &mut optimizer, &DpoStepConfig::default())?;
        let dpo = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let ganpo_metrics = ganpo_step(
            &inputs,
            &mut optimizer,
            &mut adversary,
            &GanpoStepConfig::default(),
        )?;
        let ganpo = start.elapsed().as_secs_f64();
        if step > 0 {
            dpo_s.push(dpo);
            ganpo_s.push(ganpo);
            for (column, metrics) in [dpo_metrics, ganpo_metrics].iter().enumerate() {
                for (key, seconds) in metrics {
                    if let Some(phase) = key.strip_prefix("time/") {
                        phases.entry(phase.to_string()).or_default()[column] += seconds;
                    }
                }
            }
        }
    }
    let iters = args.iters.max(1) as f64;
    let phases: serde_json::Map<String, Value> = phases
        .into_iter()
        .map(|(phase, [dpo, ganpo])| (phase, json!([dpo / iters, ganpo / iters])))
        .collect();
    Ok(json!({
        "dpo_seconds_per_step": median(dpo_s),
        "ganpo_seconds_per_step": median(ganpo_s),
        "phases": phases,
    }))
}

/// Each numeric field of a case's figures, the median over its rounds (other fields, and
/// nested ones, from the first round).
fn median_figures(rounds: &[Value]) -> Value {
    let mut merged = rounds[0].clone();
    if let Some(fields) = merged.as_object_mut() {
        for (key, value) in fields.iter_mut() {
            if value.is_number() {
                let values = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
                *value = json!(median(values));
            }
        }
    }
    merged
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A rhai-driven DPO loop against the same loop written in Rust, interleaved, on a small random
/// model; also the host's cost per step with the training step left out of both loops.
fn script_case(args: &Args) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("ganpo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pairs: Vec<Value> = (0..32)
        .map(|i| {
            json!({"prompt": format!("Question number {i}: what is {i} squared?"),
                "chosen": format!("It is {}, since {i} times {i} is {}.", i * i, i * i),
                "rejected": format!("No idea, perhaps {} or so.", i + 7)})
        })
        .collect();
    let data = dir.join("pairs.json");
    std::fs::write(&data, serde_json::to_string(&pairs)?)?;
    let steps = 20;
    let options = HostOptions {
        out_dir: dir.clone(),
        config: [
            ("data", data.display().to_string()),
            ("steps", steps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    };
    let mut host = Host::new(options)?;
    host.run(SETUP).map_err(|e| anyhow::anyhow!("{e}"))?;
    let full = host.compile(LOOP).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bare = host
        .compile(LOOP_WITHOUT_STEP)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let run = |host: &mut Host, ast| host.run_ast(ast).map_err(|e| anyhow::anyhow!("{e}"));
    let _warm_up = run(&mut host, &full)?;

    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let (mut script, mut rust) = (f64::MAX, f64::MAX);
    let (mut script_bare, mut rust_bare) = (f64::MAX, f64::MAX);
    for _ in 0..args.iters.max(1) {
        script = script.min(best(&mut || run(&mut host, &full).map(drop))?);
        rust = rust.min(best(&mut || rust_loop(&host, steps, true))?);
        script_bare = script_bare.min(best(&mut || run(&mut host, &bare).map(drop))?);
        rust_bare = rust_bare.min(best(&mut || rust_loop(&host, steps, false))?);
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(json!({
        "script_seconds_per_step": script / steps as f64,
        "rust_seconds_per_step": rust / steps as f64,
        "host_us_per_step": (script_bare - rust_bare).max(0.0) * 1e6 / steps as f64,
    }))
}

const SETUP: &str = r#"
let policy = random_model(#{family: "llama", seed: 1, hidden_size: 64, layers: 4});
let reference = policy.freeze();
let pairs = load_preferences(config.data, policy, #{max_length: 96});
let sampler = pairs.sampler(pairs.split(0.0)[0], #{batch_size: 4});
let opt = adamw(policy, #{lr: 1e-4});
"#;

/// The same loop with the step replaced by building its options: what the host adds per step.
const LOOP_WITHOUT_STEP: &str = r#"
for step in 0..config.steps {
    let b = pairs.batch(sampler.next());
    let m = #{beta: 0.1, step: step};
}
"#;

const LOOP: &str = r#"
for step in 0..config.steps {
    let b = pairs.batch(sampler.next());
    let m = dpo_step(policy, reference, b, opt, #{beta: 0.1, step: step});
}
"#;

fn rust_loop(host: &Host, steps: usize, train: bool) -> Result<()> {
    let scope = host.scope();
    let policy = scope
        .get_value::<ModelHandle>("policy")
        .context("policy")
        .context("policy")?;
    let reference = scope
        .get_value::<ModelHandle>("reference")
        .context("reference")?;
    let pairs = scope.get_value::<DatasetHandle>("pairs").context("pairs")?;
    let sampler = scope
        .get_value::<SamplerHandle>("sampler")
        .context("sampler")?;
    let opt = scope.get_value::<OptimizerHandle>("opt").context("opt")?;
    let cfg = DpoStepConfig::default();
    let device = candle_core::Device::Cpu;

    for step in 0..steps {
        let indices = BatchSampler::next_batch(&mut sampler.0.borrow_mut()).1;
        let batch = pairs.0.batch(&indices, &device)?;
        if !train {
            continue;
        }
        let policy = policy.0.borrow();
        let reference = reference.0.borrow();
        let inputs = StepInputs {
            policy: &policy.model,
            reference: Some(&reference.model),
            batch: &batch,
            reference_logps: None,
            step,
        };
        dpo_step(&inputs, &mut **opt.inner.borrow_mut(), &cfg)?;
    }
    Ok(())
}

/// Reads, chat-formats and tokenizes every pair of the data file (no length limit), then
/// batches them all, 4 pairs a batch.
fn data_case(args: &Args) -> Result<Value> {
    let tokenizer = Tokenizer::from_gguf_file(&args.model)?;
    let config = LoadConfig::default();
    let mut pairs = 0;
    let seconds = timed(args.iters, || {
        let dataset = PreferenceDataset::load(&args.data, &tokenizer, &config)?;
        let indices: Vec<usize> = (0..dataset.len()).collect();
        for chunk in indices.chunks(4) {
            dataset.batch(chunk, &Device::Cpu)?;
        }
        pairs = dataset.len();
        Ok(())
    })?;
    Ok(json!({ "seconds": seconds, "pairs": pairs }))
}

fn adversary(width: usize) -> Result<Adversary> {
    let make =
        |seed| Discriminator::transformer(TransformerDiscConfig::new(width), seed, &Device::Cpu);
    let (chosen, rejected) = (make(1)?, make(2)?);
    let optimizer = |disc: &Discriminator| -> Result<Box<dyn Optimizer>> {
        let cfg = AdamWConfig {
            lr: 2.5e-7,
            ..Default::default()
        };
        Ok(Box::new(AdamW::new(disc.vars(), cfg)?))
    };
    Ok(Adversary {
        chosen_optimizer: optimizer(&chosen)?,
        rejected_optimizer: optimizer(&rejected)?,
        chosen,
        rejected,
        means: MovingMeans::default(),
    })
}

/// The first `pairs` pairs of the data file, each row cut to `max_length` tokens.
fn real_batch(
    data: &Path,
    tokenizer: &Tokenizer,
    pairs: usize,
    max_length: usize,
) -> Result<PreferenceBatch> {
    let config = LoadConfig {
        max_length: Some(max_length),
        max_prompt_length: Some(max_length / 2),
        limit: Some(pairs),
        ..Default::default()
    };
    let dataset = PreferenceDataset::load(data, tokenizer, &config)?;
    let sampler_config = BatchConfig {
        batch_size: pairs,
        shuffle: false,
        ..Default::default()
    };
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let mut sampler = dataset.sampler(indices, &sampler_config)?;
    let (_, batch) = sampler.next_batch();
    Ok(dataset.batch(&batch, &Device::Cpu)?)
}

fn load(path: &Path, trainable: bool) -> Result<ganpo::model::Loaded> {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable,
    };
    let source = path.to_str().context("model path is not UTF-8")?;
    Ok(CausalLm::load(source, &opts)?)
}

/// Mean seconds of `iters` calls of `f`, after one untimed warm-up call.
fn timed(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// User + system CPU time of this process so far, in seconds (Linux; 0 elsewhere): on a
/// loaded machine it says what a step costs better than wall time does.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of proc_pid_stat(5): indices 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of this process, in MiB (Linux `VmHWM`; 0 elsewhere).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn find_python(explicit: Option<&Path>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = explicit.into_iter().map(Path::to_path_buf).collect();
    if let Some(env) = std::env::var_os("GANPO_PYTHON") {
        candidates.push(env.into());
    }
    candidates.push(".refenv/bin/python".into());
    candidates.push("python3".into());
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import torch, transformers"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn torch_case(python: &Path, args: &Args) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_torch.py");
    let output = Command::new(python)
        .arg(&script)
        .arg("--gguf")
        .arg(&args.model)
        .args(["--batch", &args.batch.to_string()])
        .args(["--seq", &args.seq.to_string()])
        .args(["--iters", &args.iters.to_string()])
        .args(["--threads", &num_threads().to_string()])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    last_json_line(&output.stdout).context("the torch benchmark printed no JSON")
}

fn num_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_report(results: &serde_json::Map<String, Value>, args: &Args) {
    let get = |case: &str, key: &str| results.get(case).and_then(|v| v[key].as_f64());
    println!(
        "ganpo-bench: {} threads, {} iterations per case, {} round(s) (medians), model {}",
        num_threads(),
        args.iters,
        args.rounds.max(1),
        args.model.display()
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "figure", "ganpo", "reference", "ratio"
    );

    let row = |name: &str, ours: Option<f64>, theirs: Option<f64>| {
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = ours.zip(theirs).map(|(a, b)| a / b);
        println!(
            "{:<44} {:>12} {:>12} {:>8}",
            name,
            fmt(ours),
            fmt(theirs),
            fmt(ratio)
        );
    };
    let batch = format!("{}x{}", args.batch, args.seq);
    row(
        &format!("train tokens/s, f32 {batch} (vs torch)"),
        get("train", "train_tokens_per_s"),
        get("torch", "train_tokens_per_s"),
    );
    row(
        "train CPU seconds per step (vs torch)",
        get("train", "cpu_seconds_per_step"),
        get("torch", "cpu_seconds_per_step"),
    );
    row(
        "train peak memory MiB (vs torch)",
        get("train", "peak_rss_mb"),
        get("torch", "peak_rss_mb"),
    );
    row(
        "GANPO step seconds (vs DPO step, own processes)",
        get("ganpo", "seconds_per_step"),
        get("dpo", "seconds_per_step"),
    );
    row(
        "GANPO step seconds (vs DPO, alternated, median)",
        get("steps", "ganpo_seconds_per_step"),
        get("steps", "dpo_seconds_per_step"),
    );
    row(
        "GANPO step peak memory MiB (vs DPO step)",
        get("ganpo", "peak_rss_mb"),
        get("dpo", "peak_rss_mb"),
    );
    row(
        "GANPO step peak live heap MiB (vs DPO step)",
        get("ganpo", "peak_live_mb"),
        get("dpo", "peak_live_mb"),
    );
    row(
        "scripted DPO loop seconds/step (vs Rust loop)",
        get("script", "script_seconds_per_step"),
        get("script", "rust_seconds_per_step"),
    );
    if let Some(phases) = results.get("steps").and_then(|s| s["phases"].as_object()) {
        println!("seconds per phase, alternated steps         DPO        GANPO");
        for (phase, seconds) in phases {
            let column = |i: usize| seconds[i].as_f64().unwrap_or(f64::NAN);
            println!("  {phase:<40} {:>10.2} {:>12.2}", column(0), column(1));
        }
    }
    if let (Some(seconds), Some(pairs)) = (get("data", "seconds"), get("data", "pairs")) {
        println!(
            "data: {pairs} pairs read, chat-formatted, tokenized and batched in {seconds:.3} s"
        );
    }
    if let Some(us) = get("script", "host_us_per_step") {
        println!("host cost per step, training step left out: {us:.1} us");
    }
    if let Some(torch) = results.get("torch") {
        println!(
            "reference: torch {} transformers {}",
            torch["torch"].as_str().unwrap_or("?"),
            torch["transformers"].as_str().unwrap_or("?")
        );
    }
}
