//! Batches of preference pairs as tensors, deterministic shuffling, train/eval splits and an
//! epoch iterator that reports its position and resumes from it exactly.

use candle_core::{Device, Tensor};

use super::dataset::PreferenceDataset;
use crate::{Error, Result};

/// The unit every training step consumes: B pairs as 2B right-padded rows, chosen first.
#[derive(Debug, Clone)]
pub struct PreferenceBatch {
    /// `[2B, T]` u32 token ids; rows `0..B` chosen, `B..2B` rejected; padding is the dataset's
    /// pad id.
    pub input_ids: Tensor,
    /// `[2B, T]` f32: 1 on real tokens, 0 on padding (right padding).
    pub attention_mask: Tensor,
    /// `[2B, T]` f32: 1 on completion tokens (EOS included) at the token's own position.
    pub completion_mask: Tensor,
    /// The prompt length of each of the 2B rows (after truncation).
    pub prompt_lengths: Vec<usize>,
    /// The B dataset indices (pair indices) in the batch.
    pub indices: Vec<usize>,
}

impl PreferenceDataset {
    /// Builds the batch of pairs `indices` on `device`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<PreferenceBatch> {
        if indices.is_empty() {
            return Err(Error::invalid("a preference batch needs at least one pair"));
        }

        let limits = self.limits();
        let mut rows: Vec<(&[u32], &[u32])> = Vec::with_capacity(2 * indices.len());
        let mut rejected_rows = Vec::with_capacity(indices.len());
        for &i in indices {
            let pair = self.pair(i)?;
            rows.push(limits.apply(pair.prompt, pair.chosen));
            rejected_rows.push(limits.apply(pair.prompt, pair.rejected));
        }
        rows.extend(rejected_rows);

        let width = rows
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let n = rows.len();
        let mut ids = vec![self.pad_token_id(); n * width];
        let mut attention = vec![0f32; n * width];
        let mut completion = vec![0f32; n * width];
        let mut prompt_lengths = Vec::with_capacity(n);
        for (r, (prompt, answer)) in rows.iter().enumerate() {
            let row = r * width;
            let end = prompt.len() + answer.len();
            ids[row..row + prompt.len()].copy_from_slice(prompt);
            ids[row + prompt.len()..row + end].copy_from_slice(answer);
            attention[row..row + end].fill(1.0);
            completion[row + prompt.len()..row + end].fill(1.0);
            prompt_lengths.push(prompt.len());
        }

        Ok(PreferenceBatch {
            input_ids: Tensor::from_vec(ids, (n, width), device)?,
            attention_mask: Tensor::from_vec(attention, (n, width), device)?,
            completion_mask: Tensor::from_vec(completion, (n, width), device)?,
            prompt_lengths,
            indices: indices.to_vec(),
        })
    }

    /// Splits pair indices into (train, eval): `eval_fraction` of the pairs, chosen by a
    /// deterministic shuffle from `seed`; each part is returned in ascending order.
    pub fn train_eval_split(
        &self,
        eval_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        if !(0.0..1.0).contains(&eval_fraction) {
            return Err(Error::invalid(format!(
                "eval_fraction must be in [0, 1), got {eval_fraction}"
            )));
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut order, seed);
        let n_eval = (self.len() as f64 * eval_fraction).round() as usize;

        let mut eval = order[..n_eval].to_vec();
        let mut train = order[n_eval..].to_vec();
        eval.sort_unstable();
        train.sort_unstable();
        Ok((train, eval))
    }

    /// An epoch iterator over the pairs `indices`.
    pub fn sampler(&self, indices: Vec<usize>, config: &BatchConfig) -> Result<BatchSampler> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::invalid(format!(
                "pair index {bad} is out of range: the dataset has {}",
                self.len()
            )));
        }
        let lengths = indices.iter().map(|&i| self.row_length(i)).collect();
        BatchSampler::new(indices, lengths, config.clone())
    }
}

/// How pairs are grouped into batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Pairs per batch (B).
    pub batch_size: usize,
    /// Shuffle each epoch (deterministically, from `seed` and the epoch number).
    pub shuffle: bool,
    /// The shuffling seed.
    pub seed: u64,
    /// Group pairs of similar length into batches to cut padding: each run of
    /// `batch_size * 50` shuffled pairs is sorted by length (longest first) and then cut.
    pub group_by_length: bool,
    /// Leave out the last batch of an epoch when it is smaller than `batch_size`.
    pub drop_last: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 4,
            shuffle: true,
            seed: 42,
            group_by_length: false,
            drop_last: false,
        }
    }
}

/// Where an epoch iterator stands: the next batch it will produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct BatchPosition {
    /// The epoch, from 0.
    pub epoch: usize,
    /// The batch within the epoch, from 0.
    pub batch: usize,
}

/// Produces the pair indices of each batch, epoch after epoch; the order of an epoch depends
/// only on the seed and the epoch number, so any position can be resumed exactly.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    indices: Vec<usize>,
    lengths: Vec<usize>,
    config: BatchConfig,
    position: BatchPosition,
    epoch_batches: Vec<Vec<usize>>,
}

impl BatchSampler {
    /// A sampler over `indices` whose rows are `lengths` tokens long (used only for grouping).
    pub fn new(indices: Vec<usize>, lengths: Vec<usize>, config: BatchConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::invalid("batch_size must be at least 1"));
        }
        if indices.len() != lengths.len() {
            return Err(Error::invalid(format!(
                "{} indices but {} lengths",
                indices.len(),
                lengths.len()
            )));
        }
        let mut sampler = BatchSampler {
            indices,
            lengths,
            config,
            position: BatchPosition::default(),
            epoch_batches: Vec::new(),
        };
        sampler.epoch_batches = sampler.batches_of_epoch(0);
        if sampler.epoch_batches.is_empty() {
            return Err(Error::invalid(format!(
                "{} pairs make no batch of {} (drop_last = {})",
                sampler.indices.len(),
                sampler.config.batch_size,
                sampler.config.drop_last
            )));
        }
        Ok(sampler)
    }

    /// The next batch to be produced.
    pub fn position(&self) -> BatchPosition {
        self.position
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.epoch_batches.len()
    }

    /// Moves to `position`, as if that many batches had been produced.
    pub fn seek(&mut self, position: BatchPosition) -> Result<()> {
        if position.batch >= self.batches_per_epoch() {
            return Err(Error::invalid(format!(
                "batch {} is past the end of an epoch of {} batches",
                position.batch,
                self.batches_per_epoch()
            )));
        }
        if position.epoch != self.position.epoch {
            self.epoch_batches = self.batches_of_epoch(position.epoch);
        }
        self.position = position;
        Ok(())
    }

    /// The pair indices of the next batch, with its position; epochs follow one another
    /// without end.
    pub fn next_batch(&mut self) -> (BatchPosition, Vec<usize>) {
        let position = self.position;
        let batch = self.epoch_batches[position.batch].clone();

        self.position.batch += 1;
        if self.position.batch == self.epoch_batches.len() {
            self.position = BatchPosition {
                epoch: position.epoch + 1,
                batch: 0,
            };
            self.epoch_batches = self.batches_of_epoch(self.position.epoch);
        }
        (position, batch)
    }

    /// The batches of `epoch`, in order.
    fn batches_of_epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.indices.len()).collect();
        if self.config.shuffle {
            shuffle(&mut order, mix(self.config.seed, epoch as u64));
        }
        let size = self.config.batch_size;
        if self.config.group_by_length {
            for group in order.chunks_mut(size * 50) {
                group.sort_by_key(|&k| std::cmp::Reverse(self.lengths[k]));
            }
        }

        order
            .chunks(size)
            .filter(|chunk| !self.config.drop_last || chunk.len() == size)
            .map(|chunk| chunk.iter().map(|&k| self.indices[k]).collect())
            .collect()
    }
}

impl Iterator for BatchSampler {
    type Item = (BatchPosition, Vec<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

/// Fisher-Yates shuffle driven by SplitMix64, so orders never change with a dependency.
fn shuffle(items: &mut [usize], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// One SplitMix64 step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-epoch seed from the run's seed.
fn mix(seed: u64, epoch: u64) -> u64 {
    let mut state = seed ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(n: usize, config: BatchConfig) -> BatchSampler {
        let lengths = (0..n).map(|i| (i * 7) % 13).collect();
        BatchSampler::new((0..n).collect(), lengths, config).unwrap()
    }

    #[test]
    fn every_epoch_visits_every_index_once() {
        let config = BatchConfig {
            batch_size: 3,
            ..BatchConfig::default()
        };
        let mut s = sampler(10, config);
        for _ in 0..3 {
            let mut seen: Vec<usize> = (0..s.batches_per_epoch())
                .flat_map(|_| s.next_batch().1)
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn epochs_are_shuffled_differently_but_reproducibly() {
        let mut a = sampler(20, BatchConfig::default());
        let mut b = sampler(20, BatchConfig::default());
        let first: Vec<_> = a.by_ref().take(5).map(|(_, batch)| batch).collect();
        let second: Vec<_> = a.by_ref().take(5).map(|(_, batch)| batch).collect();
        assert_ne!(first, second);
        assert_eq!(
            first,
            b.by_ref()
                .take(5)
                .map(|(_, batch)| batch)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn seeking_resumes_exactly_where_a_run_stopped() {
        let config = BatchConfig {
            batch_size: 3,
            group_by_length: true,
            ..BatchConfig::default()
        };
        let mut run = sampler(10, config.clone());
        let _ = run.by_ref().take(9).count();
        let saved = run.position();
        let expected: Vec<_> = run.take(6).collect();

        let mut resumed = sampler(10, config);
        resumed.seek(saved).unwrap();
        assert_eq!(saved, BatchPosition { epoch: 2, batch: 1 });
        assert_eq!(resumed.take(6).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn drop_last_leaves_out_the_short_batch() {
        let config = BatchConfig {
            batch_size: 4,
            drop_last: true,
            ..BatchConfig::default()
        };
        let s = sampler(10, config);
        assert_eq!(s.batches_per_epoch(), 2);
    }

    #[test]
    fn length_grouping_sorts_within_a_group_longest_first() {
        let config = BatchConfig {
            batch_size: 2,
            group_by_length: true,
            shuffle: false,
            ..BatchConfig::default()
        };
        let mut s = sampler(6, config);
        let lengths: Vec<usize> = (0..6).map(|i| (i * 7) % 13).collect();
        let order: Vec<usize> = (0..3).flat_map(|_| s.next_batch().1).collect();
        let sorted: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();
        assert!(sorted.windows(2).all(|w| w[0] >= w[1]), "{sorted:?}");
    }
}
