//! Choosing the next token from a step's logits.
//!
//! llama.cpp's `llama_sampler_sample` copies every logit into a candidate array (49,152 entries
//! of 12 bytes for SmolLM2, 150,000 for Qwen) before its chain cuts it down to top-k: ~42 µs a
//! token here for SmolLM2 (release, x86-64-v3), against ~16 µs for the path below, and it grows
//! with the vocabulary and a slower core. When the chain
//! starts with top-k (the default, 40) and has no repetition penalty (which must see the full
//! vocabulary first), the worker finds the k best logits itself in one pass that skips whole
//! blocks below the current k-th best, and hands llama.cpp only those k, sorted, for the rest of
//! the chain (top-p, min-p, temperature, the seeded draw). Greedy without a penalty is an argmax.
//! The token chosen is the one the full chain would choose: same candidates, same order, same
//! random draw (tested against the full chain below).

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use super::Sampling;

/// Above this k the one-pass selection is no cheaper than llama.cpp's sort.
const MAX_FAST_K: u32 = 256;

pub struct Picker {
    how: How,
    /// Reused between tokens: the top-k candidates, and block maxima.
    buf: Vec<LlamaTokenData>,
    scratch: Vec<f32>,
}

enum How {
    /// Temperature 0, no penalty: the first highest logit, as llama.cpp's greedy sampler.
    Argmax,
    /// Top-k here, then `rest` (everything after top-k in the chain) in llama.cpp.
    TopK(usize, LlamaSampler),
    /// The whole chain over the whole vocabulary in llama.cpp.
    Full(LlamaSampler),
}

impl Picker {
    pub fn new(s: &Sampling, n_vocab: i32) -> Self {
        // A penalty changes logits before top-k: only llama.cpp's chain applies it.
        let how = if has_penalty(s) {
            How::Full(chain(s, n_vocab, true))
        } else if s.temperature <= 0.0 {
            How::Argmax
        } else if (1..=MAX_FAST_K).contains(&s.top_k) {
            How::TopK(s.top_k as usize, chain(s, n_vocab, false))
        } else {
            How::Full(chain(s, n_vocab, true))
        };
        Picker { how, buf: Vec::new(), scratch: Vec::new() }
    }

    /// The next token from one position's logits (`n_vocab` of them).
    pub fn pick(&mut self, logits: &[f32]) -> LlamaToken {
        match &mut self.how {
            How::Argmax => {
                let mut best = 0;
                for (i, &l) in logits.iter().enumerate() {
                    if l > logits[best] {
                        best = i;
                    }
                }
                token(best)
            }
            How::TopK(k, rest) => {
                top_k(logits, *k, &mut self.buf, &mut self.scratch);
                let mut arr = LlamaTokenDataArray::new(std::mem::take(&mut self.buf), true);
                let tok = select(&mut arr, rest);
                self.buf = arr.data;
                tok
            }
            How::Full(chain) => {
                let mut arr = LlamaTokenDataArray::from_iter(
                    logits.iter().enumerate().map(|(i, &l)| LlamaTokenData::new(token(i), l, 0.0)),
                    false,
                );
                select(&mut arr, chain)
            }
        }
    }
}

fn select(arr: &mut LlamaTokenDataArray, chain: &mut LlamaSampler) -> LlamaToken {
    arr.apply_sampler(chain);
    // The chain ends in a sampler that selects (dist or greedy); an empty array cannot happen
    // with n_vocab > 0, but a token 0 is a safer answer than a panic in the worker.
    let tok = arr.selected_token().unwrap_or(LlamaToken(0));
    chain.accept(tok);
    tok
}

#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
fn token(i: usize) -> LlamaToken {
    LlamaToken(i as i32)
}

/// A repetition penalty other than 1 (0 or 1 turns it off).
fn has_penalty(s: &Sampling) -> bool {
    s.repeat_penalty > 0.0 && (s.repeat_penalty - 1.0).abs() > f32::EPSILON
}

/// The sampler chain for `s`; `with_top_k` false leaves top-k out (the worker did it).
pub fn chain(s: &Sampling, n_vocab: i32, with_top_k: bool) -> LlamaSampler {
    let mut chain = Vec::new();
    if has_penalty(s) {
        chain.push(LlamaSampler::penalties(n_vocab, 64, s.repeat_penalty, 0.0, 0.0));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 && with_top_k {
            chain.push(LlamaSampler::top_k(i32::try_from(s.top_k).unwrap_or(i32::MAX)));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(rand_seed)));
    }
    LlamaSampler::chain_simple(chain)
}

fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
    nanos.unwrap_or(0) ^ std::process::id()
}

/// The `k` highest logits, highest first (ties keep the lower token id first), into `out`.
/// `scratch` is reused between calls. Two passes: the maximum of every block of 64 logits
/// (vector instructions), then only the blocks whose maximum is among the k highest maxima are
/// searched: every other block has k logits at or above all of its own in those blocks, so
/// none of its logits can be among the k highest (and ties still go to the lower id).
fn top_k(logits: &[f32], k: usize, out: &mut Vec<LlamaTokenData>, scratch: &mut Vec<f32>) {
    const B: usize = 64;
    out.clear();
    if k == 0 {
        return;
    }
    let nb = logits.len().div_ceil(B);
    scratch.clear();
    scratch.extend(logits.chunks(B).map(block_max));
    let cut = if nb > k {
        scratch.extend_from_within(..nb);
        let (_, kth, _) = scratch[nb..].select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    } else {
        f32::NEG_INFINITY
    };
    let mut floor = f32::NEG_INFINITY;
    for (b, block) in logits.chunks(B).enumerate() {
        if scratch[b] < cut || out.len() == k && scratch[b] <= floor {
            continue;
        }
        for (j, &l) in block.iter().enumerate() {
            // NaN compares false everywhere: never a candidate.
            if out.len() == k && l <= floor || l.is_nan() {
                continue;
            }
            // After the equal ones: the lower token id (seen first) stays ahead.
            let at = out.partition_point(|d| d.logit() >= l);
            out.insert(at, LlamaTokenData::new(token(b * B + j), l, 0.0));
            out.truncate(k);
            if out.len() == k {
                floor = out[k - 1].logit();
            }
        }
    }
}

/// The highest of a block's logits (NaN ignored), 16 independent lanes so that it compiles to
/// vector max instructions (a single running maximum is a chain the compiler may not reorder).
fn block_max(block: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = block.chunks_exact(16);
    for c in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = if l > *m { l } else { *m };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    lanes.iter().fold(tail, |m, &l| if l > m { l } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampling(temperature: f32, top_k: u32, seed: u32) -> Sampling {
        Sampling {
            max_tokens: 1,
            temperature,
            top_p: 0.95,
            top_k,
            min_p: 0.05,
            repeat_penalty: 1.0,
            seed: Some(seed),
            stop: vec![],
        }
    }

    /// A logit vector shaped like a model's: most tokens far down, a few close at the top.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                #[allow(clippy::cast_precision_loss)]
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                // A long tail with a few peaks.
                if u > 0.9995 { 10.0 + 20.0 * (u - 0.9995) * 2000.0 } else { -5.0 + 15.0 * u }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn top_k_is_the_k_highest_highest_first(v in prop::collection::vec(-8i8..8, 0..3000), k in 0usize..80) {
            let logits: Vec<f32> = v.iter().map(|&x| f32::from(x) / 2.0).collect();
            let mut out = Vec::new();
            top_k(&logits, k, &mut out, &mut Vec::new());
            let mut want: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
            // Highest first; among equals the lower id first.
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(k);
            let got: Vec<(usize, f32)> = out.iter().map(|d| (d.id().0 as usize, d.logit())).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_nan_logit_is_never_a_candidate() {
        let mut out = Vec::new();
        top_k(&[1.0, f32::NAN, 0.5, 2.0], 3, &mut out, &mut Vec::new());
        let ids: Vec<i32> = out.iter().map(|d| d.id().0).collect();
        assert_eq!(ids, vec![3, 0, 2]);
    }

    #[test]
    fn the_fast_path_picks_what_llama_cpps_full_chain_picks() {
        let n = 49_152;
        let mut differ = 0;
        let mut fast_n = 0;
        for round in 0..300u32 {
            let l = logits(n, u64::from(round));
            for (temp, k) in [(0.8, 40), (1.5, 40), (0.0, 40), (0.7, 5), (1.0, 256)] {
                let s = sampling(temp, k, round.wrapping_mul(2_654_435_761));
                let mut fast = Picker::new(&s, i32::try_from(n).unwrap());
                assert!(!matches!(fast.how, How::Full(_)), "temperature {temp} top-k {k} takes the fast path");
                fast_n += 1;
                let mut full = Picker {
                    how: How::Full(chain(&s, i32::try_from(n).unwrap(), true)),
                    buf: Vec::new(),
                    scratch: Vec::new(),
                };
                // Several draws from one picker: the random state advances the same way too.
                for _ in 0..3 {
                    if fast.pick(&l) != full.pick(&l) {
                        differ += 1;
                    }
                }
            }
        }
        assert!(fast_n > 0);
        assert_eq!(differ, 0, "draws that differ from llama.cpp's full chain");
    }

    #[test]
    fn a_repeat_penalty_or_a_huge_top_k_takes_llama_cpps_chain() {
        let mut s = sampling(0.8, 40, 1);
        s.repeat_penalty = 1.1;
        assert!(matches!(Picker::new(&s, 100).how, How::Full(_)));
        s.repeat_penalty = 1.0;
        s.top_k = 1000;
        assert!(matches!(Picker::new(&s, 100).how, How::Full(_)));
        s.top_k = 0;
        assert!(matches!(Picker::new(&s, 100).how, How::Full(_)));
        s.temperature = 0.0;
        assert!(matches!(Picker::new(&s, 100).how, How::Argmax));
    }

    #[test]
    fn argmax_picks_the_first_highest() {
        let s = sampling(0.0, 40, 1);
        let mut p = Picker::new(&s, 5);
        assert_eq!(p.pick(&[0.0, 3.0, -1.0, 3.0, 2.0]), LlamaToken(1));
    }

    /// Not a test of speed (that lives in the benchmarks): prints both paths' cost per token.
    #[test]
    fn cost_per_token_is_printed() {
        let n = 49_152;
        let l = logits(n, 7);
        let s = sampling(0.8, 40, 3);
        let mut fast = Picker::new(&s, 49_152);
        let mut full = Picker { how: How::Full(chain(&s, 49_152, true)), buf: Vec::new(), scratch: Vec::new() };
        for (name, p) in [("top-k here", &mut fast), ("llama.cpp chain", &mut full)] {
            let t = std::time::Instant::now();
            for _ in 0..200 {
                std::hint::black_box(p.pick(&l));
            }
            eprintln!("{name}: {:?} per token", t.elapsed() / 200);
        }
    }
}
