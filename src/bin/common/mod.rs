//! What both binaries share: device parsing, the terminal progress sink, output routing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::{bail, Context};
use candle_core::Device;
use ganpo::script::ProgressSink;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `cpu`, `cuda` or `cuda:N` as a candle device.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(0).context("opening CUDA device 0 (built with --features cuda?)")
        }
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}")),
            _ => bail!("unknown device `{spec}`; use cpu, cuda or cuda:N"),
        },
    }
}

/// Progress bars on stderr with rate and ETA; hidden entirely when stderr is not a terminal.
pub struct TerminalProgress {
    multi: MultiProgress,
    bars: RefCell<HashMap<u64, ProgressBar>>,
}

impl TerminalProgress {
    /// Bars drawn on stderr when it is a terminal, nowhere otherwise.
    pub fn new() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: RefCell::new(HashMap::new()),
        }
    }

    /// A handle that prints lines above the bars without tearing them.
    pub fn multi(&self) -> MultiProgress {
        self.multi.clone()
    }
}

impl ProgressSink for TerminalProgress {
    fn start(&self, id: u64, total: u64, label: &str) {
        let bar = self.multi.add(ProgressBar::new(total));
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        self.bars.borrow_mut().insert(id, bar);
    }

    fn advance(&self, id: u64, delta: u64, message: &str) {
        if let Some(bar) = self.bars.borrow().get(&id) {
            bar.inc(delta);
            if !message.is_empty() {
                bar.set_message(message.to_string());
            }
        }
    }

    fn finish(&self, id: u64) {
        if let Some(bar) = self.bars.borrow_mut().remove(&id) {
            bar.finish();
        }
    }
}
