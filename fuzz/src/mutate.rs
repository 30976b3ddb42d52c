//! The mutations: byte edits for any input, JSON edits for the targets that read JSON, and the
//! framing of a safetensors header (an 8-byte little-endian length, then the JSON).
//!
//! Everything draws from one seeded [`StdRng`], so a seed replays the same inputs.

use crate::json::{self, Spans};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::ops::Range;

/// Inputs are cut to this size after mutating (the seeds are a few KiB; a parser's cost grows with
/// its input, and long inputs find nothing short ones do not).
pub const MAX_INPUT: usize = 64 * 1024;

/// What a target reads, which picks the mutations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Text without structure the mutator knows (tokens: the target's dictionary helps).
    Text,
    Json,
    /// A u64 little-endian byte count, then that many bytes of JSON, then data.
    LengthPrefixedJson,
}

/// Bytes that break parsers: NUL, the sign bits, and JSON's own punctuation.
const INTERESTING_BYTES: &[u8] =
    &[0, 0xff, 0x7f, 0x80, 1, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'\n', b'-'];

/// Integers that sit on a boundary, written as 1, 2, 4 or 8 little-endian bytes.
const INTERESTING_INTS: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    (1 << 32) + 64,
    i64::MAX as u64,
    u64::MAX,
    100_000_001,
];

/// Number texts that break number handling: out of f64 range, beyond u32/i64/u64, negative zero,
/// and the non-JSON spellings of NaN and infinity.
pub const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-1",
    "1",
    "64",
    "128",
    "4294967295",
    "4294967296",
    "4294967360",
    "2147483648",
    "-2147483649",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "9007199254740993",
    "1e309",
    "-1e309",
    "1e-400",
    "1.7976931348623157e308",
    "5e-324",
    "0.1",
    "1.0",
    "NaN",
    "Infinity",
    "-inf",
    "1e",
    "0x10",
    "01",
];

/// String values that break what is done with strings: empty, control characters, terminal
/// escapes, a lone surrogate, a long one.
const INTERESTING_STRINGS: &[&str] = &[
    r#""""#,
    r#"" ""#,
    r#""\u0000""#,
    r#""\u001b[2J\u001b[31mred""#,
    r#""\ud800""#,
    r#""\n\t\r""#,
    r#""sm_90a""#,
    r#""sm_""#,
    r#""NaN""#,
    r#""../../etc/passwd""#,
    r#""\u00e9\u4e2d\ud83d\ude00""#,
];

/// Values of every JSON type, to put one where another is expected.
const OTHER_VALUES: &[&str] = &["null", "true", "false", "0", r#""""#, "[]", "{}", "[null]", r#"{"":0}"#];

/// A seeded source of mutations for one target.
pub struct Mutator {
    rng: StdRng,
    kind: InputKind,
    dictionary: Vec<&'static str>,
}

impl Mutator {
    pub fn new(rng: StdRng, kind: InputKind, dictionary: &[&[&'static str]]) -> Self {
        Mutator { rng, kind, dictionary: dictionary.concat() }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Applies one to four mutations to `input`; `other` is a second corpus entry to splice from.
    pub fn mutate(&mut self, input: &mut Vec<u8>, other: &[u8]) {
        let rounds = self.rng.gen_range(1..=4);
        for _ in 0..rounds {
            match self.kind {
                InputKind::Text => self.bytes(input, other),
                InputKind::Json => self.json_or_bytes(input, other),
                InputKind::LengthPrefixedJson => self.framed(input, other),
            }
        }
        input.truncate(MAX_INPUT);
    }

    /// Mostly JSON edits (when the input is still a document), sometimes byte edits.
    fn json_or_bytes(&mut self, input: &mut Vec<u8>, other: &[u8]) {
        if self.rng.gen_bool(0.75) {
            if let Some(spans) = json::scan(input) {
                self.json(input, &spans, other);
                return;
            }
        }
        self.bytes(input, other);
    }

    /// Edits the JSON between the length prefix and the data, then usually fixes the prefix so the
    /// edit reaches the JSON parser; sometimes edits the prefix or the raw bytes instead.
    fn framed(&mut self, input: &mut Vec<u8>, other: &[u8]) {
        if input.len() < 8 || self.rng.gen_bool(0.1) {
            return self.bytes(input, other);
        }
        let declared = u64::from_le_bytes(input[..8].try_into().expect("8 bytes"));
        let end = usize::try_from(declared).map_or(input.len(), |n| n.saturating_add(8).min(input.len()));
        let mut header = input[8..end].to_vec();
        let data = input[end..].to_vec();
        let other_header = other.get(8..).unwrap_or_default();
        self.json_or_bytes(&mut header, other_header);
        let prefix = if self.rng.gen_bool(0.85) {
            header.len() as u64
        } else {
            *INTERESTING_INTS.choose(&mut self.rng).expect("not empty")
        };
        input.clear();
        input.extend_from_slice(&prefix.to_le_bytes());
        input.extend_from_slice(&header);
        input.extend_from_slice(&data);
    }

    /// One byte-level edit.
    pub fn bytes(&mut self, input: &mut Vec<u8>, other: &[u8]) {
        let rng = &mut self.rng;
        if input.is_empty() {
            input.push(rng.gen());
            return;
        }
        let at = rng.gen_range(0..input.len());
        match rng.gen_range(0..10) {
            0 => input[at] ^= 1 << rng.gen_range(0..8),
            1 => input[at] = *INTERESTING_BYTES.choose(rng).expect("not empty"),
            2 => {
                let value = *INTERESTING_INTS.choose(rng).expect("not empty");
                let width = *[1usize, 2, 4, 8].choose(rng).expect("not empty");
                let end = (at + width).min(input.len());
                input[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            3 => splice_in(input, at..at, INTERESTING_NUMBERS.choose(rng).expect("not empty").as_bytes()),
            4 => {
                let len = rng.gen_range(1..=(input.len() - at).min(64));
                input.drain(at..at + len);
            }
            5 => {
                let len = rng.gen_range(1..=(input.len() - at).min(256));
                let chunk = input[at..at + len].to_vec();
                let to = rng.gen_range(0..=input.len());
                splice_in(input, to..to, &chunk);
            }
            6 => {
                let junk: Vec<u8> = (0..rng.gen_range(1..=8)).map(|_| rng.gen()).collect();
                splice_in(input, at..at, &junk);
            }
            7 if !other.is_empty() => {
                // Splice: our head, the other entry's tail.
                let from = rng.gen_range(0..other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            8 if !self.dictionary.is_empty() => {
                let word = self.dictionary.choose(rng).expect("not empty").as_bytes();
                let end = if rng.gen_bool(0.5) { at } else { (at + word.len()).min(input.len()) };
                splice_in(input, at..end, word);
            }
            _ => input.truncate(at),
        }
    }

    /// One JSON-level edit of a document whose pieces are `spans`.
    fn json(&mut self, input: &mut Vec<u8>, spans: &Spans, other: &[u8]) {
        let rng = &mut self.rng;
        let pick = |rng: &mut StdRng, ranges: &[Range<usize>]| ranges.choose(rng).cloned();
        match rng.gen_range(0..10) {
            0 | 1 => {
                if let Some(r) = pick(rng, &spans.numbers) {
                    let number = INTERESTING_NUMBERS.choose(rng).expect("not empty");
                    splice_in(input, r, number.as_bytes());
                }
            }
            2 => {
                if let Some(r) = pick(rng, &spans.strings) {
                    let text = match self.dictionary.choose(rng) {
                        Some(word) if rng.gen_bool(0.5) => format!("\"{word}\""),
                        _ => INTERESTING_STRINGS.choose(rng).expect("not empty").to_string(),
                    };
                    splice_in(input, r, text.as_bytes());
                }
            }
            3 => {
                // The same key twice: what serde_json collapses silently (last wins).
                if let Some(r) = pick(rng, &spans.members) {
                    let copy = [b",", &input[r.clone()]].concat();
                    splice_in(input, r.end..r.end, &copy);
                }
            }
            4 => {
                let ranges = if rng.gen_bool(0.5) { &spans.members } else { &spans.elements };
                if let Some(r) = pick(rng, ranges) {
                    input.drain(json::removal_range(input, &r));
                }
            }
            5 => {
                if let Some(r) = pick(rng, &spans.elements) {
                    let copies = *[1usize, 1, 2, 100].choose(rng).expect("not empty");
                    let copy = [b",", &input[r.clone()]].concat().repeat(copies);
                    splice_in(input, r.end..r.end, &copy);
                }
            }
            6 => {
                if let Some(r) = pick(rng, &spans.values) {
                    let depth = *[2usize, 64, 127, 128, 129, 600].choose(rng).expect("not empty");
                    let (open, close) = if rng.gen_bool(0.5) { ("[", "]") } else { (r#"{"a":"#, "}") };
                    let wrapped =
                        [open.repeat(depth).as_bytes(), &input[r.clone()], close.repeat(depth).as_bytes()].concat();
                    splice_in(input, r, &wrapped);
                }
            }
            7 => {
                if let Some(r) = pick(rng, &spans.values) {
                    splice_in(input, r, OTHER_VALUES.choose(rng).expect("not empty").as_bytes());
                }
            }
            8 => {
                if let Some(r) = pick(rng, &spans.keys) {
                    // Rename a key: to one the document already has (a duplicate), or a dictionary word.
                    let key = match self.dictionary.choose(rng) {
                        Some(word) if rng.gen_bool(0.5) => format!("\"{word}\"").into_bytes(),
                        _ => input[pick(rng, &spans.keys).expect("a key was picked")].to_vec(),
                    };
                    splice_in(input, r, &key);
                }
            }
            _ => {
                // A value or member of the other corpus entry, put in place of a value of ours or
                // into one of our objects: structure from valid documents in unexpected places.
                let Some(theirs) = json::scan(other) else { return };
                if rng.gen_bool(0.5) {
                    if let (Some(ours), Some(r)) = (pick(rng, &spans.values), pick(rng, &theirs.values)) {
                        splice_in(input, ours, &other[r]);
                    }
                } else if let (Some(object), Some(r)) = (pick(rng, &spans.objects), pick(rng, &theirs.members)) {
                    let empty = input[object.clone()].iter().filter(|b| !b.is_ascii_whitespace()).count() == 2;
                    let member = if empty { other[r].to_vec() } else { [&other[r], &b","[..]].concat() };
                    splice_in(input, object.start + 1..object.start + 1, &member);
                }
            }
        }
    }
}

/// Replaces `range` of `input` with `with`.
fn splice_in(input: &mut Vec<u8>, range: Range<usize>, with: &[u8]) {
    input.splice(range, with.iter().copied());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn mutator(kind: InputKind, seed: u64) -> Mutator {
        Mutator::new(StdRng::seed_from_u64(seed), kind, &[&["version", "entries"]])
    }

    #[test]
    fn a_seed_replays_the_same_inputs() {
        let seed = br#"{"version": 1, "entries": [{"a": 1.5, "b": "x"}]}"#;
        let run = |s| {
            let mut m = mutator(InputKind::Json, s);
            (0..200)
                .map(|_| {
                    let mut input = seed.to_vec();
                    m.mutate(&mut input, br#"{"c": [1, 2]}"#);
                    input
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn json_edits_produce_duplicate_keys_and_out_of_range_numbers() {
        let seed = br#"{"version": 1, "entries": [{"a": 1.5}]}"#;
        let mut m = mutator(InputKind::Json, 1);
        let (mut duplicated, mut huge) = (false, false);
        for _ in 0..2000 {
            let mut input = seed.to_vec();
            m.mutate(&mut input, seed);
            let text = String::from_utf8_lossy(&input);
            duplicated |= text.matches("\"version\"").count() > 1;
            huge |= text.contains("1e309");
        }
        assert!(duplicated && huge);
    }

    #[test]
    fn framed_inputs_keep_a_matching_length_prefix_most_of_the_time() {
        let header = br#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let seed = [&(header.len() as u64).to_le_bytes()[..], header, &[0u8; 4]].concat();
        let mut m = mutator(InputKind::LengthPrefixedJson, 3);
        let mut matching = 0;
        for _ in 0..500 {
            let mut input = seed.clone();
            m.mutate(&mut input, &seed);
            let n = input.get(..8).map(|p| u64::from_le_bytes(p.try_into().unwrap()));
            matching += n.and_then(|n| n.checked_add(8)).is_some_and(|end| end <= input.len() as u64) as usize;
        }
        assert!(matching > 250, "{matching} of 500");
    }
}
