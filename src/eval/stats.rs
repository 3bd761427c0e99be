//! Statistics of generated token sequences: distinct-n and the repeated n-gram rate.
//!
//! Both are computed on answer tokens with any final EOS removed.

use std::collections::HashSet;

/// Distinct-n (Li et al., 2016), corpus level: the number of different n-grams over all
/// `answers` divided by the number of n-grams they contain. `None` when no answer is `n`
/// tokens long.
pub fn distinct_n(answers: &[Vec<u32>], n: usize) -> Option<f64> {
    if n == 0 {
        return None;
    }

    let mut seen = HashSet::new();
    let mut total = 0usize;
    for answer in answers {
        for gram in answer.windows(n) {
            seen.insert(gram);
            total += 1;
        }
    }
    (total > 0).then(|| seen.len() as f64 / total as f64)
}

/// The repetition rate: over all `answers`, the fraction of n-grams that already occurred
/// earlier in the same answer (repeats within one answer only; a phrase shared by two answers
/// is not a repeat). With `n = 4`, an answer that loops on one phrase tends to 1, a text
/// without repeated 4-grams scores 0. `None` when no answer is `n` tokens long.
pub fn repetition_rate(answers: &[Vec<u32>], n: usize) -> Option<f64> {
    if n == 0 {
        return None;
    }

    let mut repeated = 0usize;
    let mut total = 0usize;
    for answer in answers {
        let mut seen = HashSet::new();
        for gram in answer.windows(n) {
            if !seen.insert(gram) {
                repeated += 1;
            }
            total += 1;
        }
    }
    (total > 0).then(|| repeated as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_counts_different_ngrams_over_all_answers() {
        // Unigrams: 1 2 3 1 | 1 4 -> 6 in all, {1,2,3,4} different.
        let answers = vec![vec![1, 2, 3, 1], vec![1, 4]];
        assert_eq!(distinct_n(&answers, 1), Some(4.0 / 6.0));
        // Bigrams: (1,2) (2,3) (3,1) | (1,4) -> 4 in all, all different.
        assert_eq!(distinct_n(&answers, 2), Some(1.0));
        assert_eq!(distinct_n(&[vec![7]], 2), None);
    }

    #[test]
    fn repetition_counts_4grams_seen_before_in_the_same_answer_only() {
        // 1 2 3 4 1 2 3 4: 4-grams 1234 2341 3412 4123 1234 -> one repeat out of 5.
        let looping = vec![1, 2, 3, 4, 1, 2, 3, 4];
        assert_eq!(repetition_rate(&[looping], 4), Some(0.2));
        // The same 4-gram in two answers is no repeat.
        let twice = vec![vec![1, 2, 3, 4], vec![1, 2, 3, 4]];
        assert_eq!(repetition_rate(&twice, 4), Some(0.0));
        // A constant answer of 10 tokens: 7 4-grams, 6 of them repeats.
        assert_eq!(repetition_rate(&[vec![5; 10]], 4), Some(6.0 / 7.0));
        assert_eq!(repetition_rate(&[vec![1, 2, 3]], 4), None);
    }
}
