//! Where the pieces of a JSON document are: byte ranges of its numbers, strings, keys, values,
//! object members and array elements, so the mutator can edit a document at the level the parsers
//! see it (duplicate a key, replace a number, drop a member) instead of only flipping bytes.
//!
//! This is a scanner, not a validating parser: it accepts what serde_json accepts in the common
//! case and gives up (`None`) on anything else, and the mutator then falls back to byte edits.

use std::ops::Range;

/// Nesting the scanner follows before giving up (the targets are fed much deeper documents; this
/// only bounds the scanner's own recursion).
const MAX_DEPTH: usize = 256;

/// The byte ranges of one document's pieces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spans {
    pub numbers: Vec<Range<usize>>,
    /// String values (not keys), quotes included.
    pub strings: Vec<Range<usize>>,
    /// Object keys, quotes included.
    pub keys: Vec<Range<usize>>,
    /// Every value, the whole document included.
    pub values: Vec<Range<usize>>,
    /// `"key": value`, from the key's opening quote to the value's end.
    pub members: Vec<Range<usize>>,
    pub elements: Vec<Range<usize>>,
    /// Objects, braces included.
    pub objects: Vec<Range<usize>>,
}

/// Scans `text`; `None` when it is not a JSON document the scanner follows.
pub fn scan(text: &[u8]) -> Option<Spans> {
    let mut s = Scanner { text, at: 0, spans: Spans::default() };
    s.ws();
    s.value(0)?;
    s.ws();
    (s.at == text.len()).then_some(s.spans)
}

struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
    spans: Spans,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn value(&mut self, depth: usize) -> Option<Range<usize>> {
        if depth > MAX_DEPTH {
            return None;
        }
        let start = self.at;
        match self.peek()? {
            b'{' => self.object(depth)?,
            b'[' => self.array(depth)?,
            b'"' => {
                let r = self.string()?;
                self.spans.strings.push(r);
            }
            b'-' | b'0'..=b'9' => {
                while matches!(self.peek(), Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
                    self.at += 1;
                }
                self.spans.numbers.push(start..self.at);
            }
            _ => {
                let word = [&b"true"[..], b"false", b"null"].into_iter().find(|w| self.text[start..].starts_with(w))?;
                self.at += word.len();
            }
        }
        self.spans.values.push(start..self.at);
        Some(start..self.at)
    }

    fn string(&mut self) -> Option<Range<usize>> {
        let start = self.at;
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        Some(start..self.at)
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        let start = self.at;
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_none() {
            loop {
                self.ws();
                let key = self.string()?;
                self.spans.keys.push(key.clone());
                self.ws();
                self.eat(b':')?;
                self.ws();
                let value = self.value(depth + 1)?;
                self.spans.members.push(key.start..value.end);
                self.ws();
                if self.eat(b',').is_none() {
                    self.eat(b'}')?;
                    break;
                }
            }
        }
        self.spans.objects.push(start..self.at);
        Some(())
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            let element = self.value(depth + 1)?;
            self.spans.elements.push(element);
            self.ws();
            if self.eat(b',').is_none() {
                return self.eat(b']');
            }
        }
    }
}

/// The range to cut to remove the member or element at `r` with one of its separating commas, so
/// the document stays valid JSON.
pub fn removal_range(text: &[u8], r: &Range<usize>) -> Range<usize> {
    let is_ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut end = r.end;
    while end < text.len() && is_ws(text[end]) {
        end += 1;
    }
    if text.get(end) == Some(&b',') {
        return r.start..end + 1;
    }
    let mut start = r.start;
    while start > 0 && is_ws(text[start - 1]) {
        start -= 1;
    }
    if start > 0 && text[start - 1] == b',' {
        return start - 1..r.end;
    }
    r.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str, ranges: &[Range<usize>]) -> Vec<String> {
        ranges.iter().map(|r| text[r.clone()].to_string()).collect()
    }

    #[test]
    fn finds_every_piece_of_a_document() {
        let text = r#"{"a": [1, -2.5e3, "x"], "b": {"c": null}, "d": true}"#;
        let s = scan(text.as_bytes()).unwrap();
        assert_eq!(pieces(text, &s.numbers), ["1", "-2.5e3"]);
        assert_eq!(pieces(text, &s.strings), [r#""x""#]);
        assert_eq!(pieces(text, &s.keys), [r#""a""#, r#""b""#, r#""c""#, r#""d""#]);
        assert_eq!(
            pieces(text, &s.members),
            [r#""a": [1, -2.5e3, "x"]"#, r#""c": null"#, r#""b": {"c": null}"#, r#""d": true"#]
        );
        assert_eq!(pieces(text, &s.elements), ["1", "-2.5e3", r#""x""#]);
        assert_eq!(pieces(text, &s.objects), [r#"{"c": null}"#, text]);
        assert_eq!(s.values.last(), Some(&(0..text.len())));
    }

    #[test]
    fn gives_up_on_what_is_not_json() {
        for text in ["", "{", r#"{"a" 1}"#, "[1,", "nul", r#""open"#, "1 2", "{\"a\":1}}"] {
            assert_eq!(scan(text.as_bytes()), None, "{text}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(scan(deep.as_bytes()), None);
    }

    #[test]
    fn removing_a_member_keeps_the_document_valid() {
        let text = r#"{"a": 1, "b": 2, "c": 3}"#;
        let s = scan(text.as_bytes()).unwrap();
        for member in &s.members {
            let mut cut = text.as_bytes().to_vec();
            cut.drain(removal_range(text.as_bytes(), member));
            let left: serde_json::Value = serde_json::from_slice(&cut).unwrap();
            assert_eq!(left.as_object().unwrap().len(), 2, "{}", String::from_utf8_lossy(&cut));
        }
        let only = br#"{"a": 1}"#;
        let s = scan(only).unwrap();
        assert_eq!(removal_range(only, &s.members[0]), s.members[0]);
    }
}
