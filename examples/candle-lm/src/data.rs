//! The corpus: sbgen's documentation as characters, its first 90% for training and the rest held
//! out, random windows as batches, and sampling from logits.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;

/// The text the model learns (built into the binary, so it runs from any directory).
const TEXT: &str = include_str!("../data/corpus.txt");

pub struct Corpus {
    chars: Vec<char>,
    index: BTreeMap<char, u32>,
    ids: Vec<u32>,
    /// Tokens `0..split` train, `split..` validate.
    split: usize,
}

impl Corpus {
    pub fn load() -> Result<Corpus> {
        let mut chars: Vec<char> = TEXT.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        let index: BTreeMap<char, u32> = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        let ids: Vec<u32> = TEXT.chars().map(|c| index[&c]).collect();
        let split = ids.len() * 9 / 10;
        Ok(Corpus { chars, index, ids, split })
    }

    pub fn vocab(&self) -> usize {
        self.chars.len()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids: Option<Vec<u32>> = text.chars().map(|c| self.index.get(&c).copied()).collect();
        match ids {
            Some(ids) if !ids.is_empty() => Ok(ids),
            Some(_) => bail!("the prompt is empty"),
            None => bail!("the prompt has a character the corpus does not"),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars[i as usize]).collect()
    }

    /// `(inputs, targets)`, each u32 `(batch, seq)`: random windows of the training part, targets
    /// shifted by one.
    pub fn batch(&self, rng: &mut StdRng, batch: usize, seq: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        self.windows(rng, 0..self.split, batch, seq, dev)
    }

    pub fn validation_batch(
        &self,
        rng: &mut StdRng,
        batch: usize,
        seq: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.windows(rng, self.split..self.ids.len(), batch, seq, dev)
    }

    fn windows(
        &self,
        rng: &mut StdRng,
        range: std::ops::Range<usize>,
        batch: usize,
        seq: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if range.len() < seq + 1 {
            bail!("--seq {seq} is longer than the corpus part ({} characters)", range.len());
        }
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let start = rng.gen_range(range.start..range.end - seq);
            x.extend_from_slice(&self.ids[start..start + seq]);
            y.extend_from_slice(&self.ids[start + 1..start + seq + 1]);
        }
        Ok((Tensor::from_vec(x, (batch, seq), dev)?, Tensor::from_vec(y, (batch, seq), dev)?))
    }
}

/// Samples a token from `(vocab,)` logits at `temperature`.
pub fn sample(logits: &Tensor, temperature: f64, rng: &mut StdRng) -> Result<u32> {
    let logits: Vec<f32> = (logits.to_dtype(DType::F32)? / temperature)?.to_vec1()?;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        bail!("the logits are not finite");
    }
    let mut pick = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        pick -= w;
        if pick <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(weights.len() as u32 - 1)
}
