//! Pre-splitting of text into chunks ("pre-tokens").
//!
//! Two implementations produce the same chunks for [`DEFAULT_PATTERN`]:
//!
//! * [`Splitter::Regex`]: any pattern, run through `fancy-regex`.
//! * [`Splitter::Fast`]: a hand-written matcher for exactly [`DEFAULT_PATTERN`]. It walks
//!   the text char by char and decides which alternative of the pattern matches, the way a
//!   backtracking engine would (leftmost alternative wins; possessive parts never give back).
//!   The character classes (`\p{L}`, `\p{N}`, `\s`, and the case-insensitive contraction
//!   letters) are taken from `regex-syntax`, the very crate `fancy-regex` uses, so both paths
//!   agree on every code point by construction.
//!
//! Chunking follows HF `Split(behavior="Isolated")`: text that no match covers becomes a chunk
//! of its own, so the chunks always concatenate back to the input. (For the default pattern
//! every position is covered by some alternative, so no such gap ever occurs.)

use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

/// GPT-4 (cl100k) split pattern with numbers grouped by 1-2 digits.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// Per-code-point flags.
const F_L: u8 = 1; // \p{L}
const F_N: u8 = 2; // \p{N}
const F_WS: u8 = 4; // \s
const F_SDMT: u8 = 8; // (?i:[sdmt])
const F_CL: u8 = 16; // (?i:l)
const F_CV: u8 = 32; // (?i:v)
const F_CE: u8 = 64; // (?i:e)
const F_CR: u8 = 128; // (?i:r)

struct Tables {
    /// code point >> 8  ->  index into `blocks`
    index: Vec<u16>,
    blocks: Vec<[u8; 256]>,
}

impl Tables {
    #[inline(always)]
    fn flags(&self, cp: u32) -> u8 {
        self.blocks[self.index[(cp >> 8) as usize] as usize][(cp & 0xff) as usize]
    }
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(true)
        .build()
        .parse(pattern)
        .expect("built-in class pattern must parse");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("pattern {pattern:?} did not parse to a Unicode class: {other:?}"),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        const N_CP: usize = 0x110000;
        let mut flat = vec![0u8; N_CP];
        let classes: [(&str, u8); 8] = [
            (r"\p{L}", F_L),
            (r"\p{N}", F_N),
            (r"\s", F_WS),
            (r"(?i:[sdmt])", F_SDMT),
            (r"(?i:[l])", F_CL),
            (r"(?i:[v])", F_CV),
            (r"(?i:[e])", F_CE),
            (r"(?i:[r])", F_CR),
        ];
        for (pat, flag) in classes {
            for (lo, hi) in class_ranges(pat) {
                for f in &mut flat[lo as usize..=hi as usize] {
                    *f |= flag;
                }
            }
        }
        let mut index = Vec::with_capacity(N_CP >> 8);
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut seen: ahash::AHashMap<[u8; 256], u16> = ahash::AHashMap::new();
        for chunk in flat.chunks_exact(256) {
            let block: [u8; 256] = chunk.try_into().unwrap();
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                (blocks.len() - 1) as u16
            });
            index.push(id);
        }
        Tables { index, blocks }
    })
}

/// Decode the UTF-8 char starting at byte `i` of valid UTF-8 `s`: (code point, byte length).
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i];
    if b0 < 0x80 {
        (b0 as u32, 1)
    } else if b0 < 0xE0 {
        ((((b0 & 0x1F) as u32) << 6) | (s[i + 1] & 0x3F) as u32, 2)
    } else if b0 < 0xF0 {
        (
            (((b0 & 0x0F) as u32) << 12)
                | (((s[i + 1] & 0x3F) as u32) << 6)
                | (s[i + 2] & 0x3F) as u32,
            3,
        )
    } else {
        (
            (((b0 & 0x07) as u32) << 18)
                | (((s[i + 1] & 0x3F) as u32) << 12)
                | (((s[i + 2] & 0x3F) as u32) << 6)
                | (s[i + 3] & 0x3F) as u32,
            4,
        )
    }
}

const CR: u32 = '\r' as u32;
const LF: u32 = '\n' as u32;

#[inline(always)]
fn is_punct(f: u8) -> bool {
    f & (F_L | F_N | F_WS) == 0
}

/// End (exclusive) of the chunk of DEFAULT_PATTERN that starts at byte `i` (< s.len()).
///
/// Alternatives, tried in order (as the regex engine does):
///  1. `'(?i:[sdmt]|ll|ve|re)`
///  2. `[^\r\n\p{L}\p{N}]?+\p{L}+`  (the optional prefix is possessive: if present it must be
///     followed by a letter)
///  3. `\p{N}{1,2}`
///  4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`
///  5. `\s*[\r\n]`      -> up to the last CR/LF of the whitespace run
///  6. `\s+(?!\S)`      -> the whole run at end of text, else the run minus its last char
///  7. `\s+`            -> a single whitespace char followed by non-whitespace
///
/// Every char is a letter, a number, whitespace or "other", so one of them always matches.
#[inline]
fn fast_chunk_end(t: &Tables, s: &[u8], i: usize) -> usize {
    let n = s.len();
    let (c0, l0) = decode(s, i);
    let f0 = t.flags(c0);
    let j = i + l0;

    // 1. contractions
    if c0 == '\'' as u32 && j < n {
        let (c1, l1) = decode(s, j);
        let f1 = t.flags(c1);
        if f1 & F_SDMT != 0 {
            return j + l1;
        }
        let k = j + l1;
        if k < n && f1 & (F_CL | F_CV | F_CR) != 0 {
            let (c2, l2) = decode(s, k);
            let f2 = t.flags(c2);
            if (f1 & F_CL != 0 && f2 & F_CL != 0) || (f1 & (F_CV | F_CR) != 0 && f2 & F_CE != 0) {
                return k + l2;
            }
        }
    }

    // 2. optional non-letter/number/newline prefix, then letters
    if f0 & F_L != 0 {
        return letters_end(t, s, j);
    }
    if f0 & F_N == 0 && c0 != CR && c0 != LF && j < n {
        let (c1, l1) = decode(s, j);
        if t.flags(c1) & F_L != 0 {
            return letters_end(t, s, j + l1);
        }
    }

    // 3. one or two numbers
    if f0 & F_N != 0 {
        if j < n {
            let (c1, l1) = decode(s, j);
            if t.flags(c1) & F_N != 0 {
                return j + l1;
            }
        }
        return j;
    }

    // 4. optional space, run of "other" chars, trailing CR/LF
    if c0 == ' ' as u32 && j < n {
        let (c1, l1) = decode(s, j);
        if is_punct(t.flags(c1)) {
            return newlines_end(s, punct_end(t, s, j + l1));
        }
    }
    if is_punct(f0) {
        return newlines_end(s, punct_end(t, s, j));
    }

    // 5-7. whitespace run (c0 is whitespace here)
    let mut k = i;
    let mut last_nl_end = 0usize;
    let mut last_start = i;
    while k < n {
        let (c, l) = decode(s, k);
        if t.flags(c) & F_WS == 0 {
            break;
        }
        if c == CR || c == LF {
            last_nl_end = k + l;
        }
        last_start = k;
        k += l;
    }
    if last_nl_end != 0 {
        return last_nl_end; // 5.
    }
    if k == n {
        return k; // 6. at end of text
    }
    if last_start > i {
        return last_start; // 6. backtracked by one char
    }
    k // 7.
}

#[inline(always)]
fn letters_end(t: &Tables, s: &[u8], mut k: usize) -> usize {
    let n = s.len();
    while k < n {
        let b = s[k];
        if b < 0x80 {
            if !b.is_ascii_alphabetic() {
                return k;
            }
            k += 1;
        } else {
            let (c, l) = decode(s, k);
            if t.flags(c) & F_L == 0 {
                return k;
            }
            k += l;
        }
    }
    k
}

#[inline(always)]
fn punct_end(t: &Tables, s: &[u8], mut k: usize) -> usize {
    let n = s.len();
    while k < n {
        let (c, l) = decode(s, k);
        if !is_punct(t.flags(c)) {
            return k;
        }
        k += l;
    }
    k
}

#[inline(always)]
fn newlines_end(s: &[u8], mut k: usize) -> usize {
    while k < s.len() && (s[k] == b'\r' || s[k] == b'\n') {
        k += 1;
    }
    k
}

/// Splits text into chunks.
pub enum Splitter {
    Fast,
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// Splitter for `pattern`; the fast path is used when the pattern is exactly
    /// DEFAULT_PATTERN and `force_regex` is false.
    pub fn new(pattern: &str, force_regex: bool) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN && !force_regex {
            tables();
            return Ok(Splitter::Fast);
        }
        fancy_regex::Regex::new(pattern)
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    pub fn is_fast(&self) -> bool {
        matches!(self, Splitter::Fast)
    }

    /// Calls `f` on every (non-empty) chunk of `text`, in order.
    #[inline]
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Fast => {
                let t = tables();
                let s = text.as_bytes();
                let mut i = 0;
                while i < s.len() {
                    let e = fast_chunk_end(t, s, i);
                    // SAFETY-free: slicing a str at char boundaries; `e` always ends a char.
                    f(&text[i..e]);
                    i = e;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                let mut last = 0;
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex error while splitting: {e}"))?;
                    if m.start() > last {
                        f(&text[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        f(m.as_str());
                    }
                    last = m.end();
                }
                if last < text.len() {
                    f(&text[last..]);
                }
                Ok(())
            }
        }
    }

    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |c| out.push(c))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(text: &str) {
        static SPLITTERS: OnceLock<(Splitter, Splitter)> = OnceLock::new();
        let (fast, slow) = SPLITTERS.get_or_init(|| {
            (
                Splitter::new(DEFAULT_PATTERN, false).unwrap(),
                Splitter::new(DEFAULT_PATTERN, true).unwrap(),
            )
        });
        assert!(fast.is_fast() && !slow.is_fast());
        assert_eq!(
            fast.split(text).unwrap(),
            slow.split(text).unwrap(),
            "text {text:?}"
        );
    }

    #[test]
    fn fast_equals_regex_on_samples() {
        for text in [
            "",
            "Hello world",
            "I'm here, you'LL see 'Ve 're 'd 's 'ſ 'x",
            "  leading and trailing  ",
            "a\r\n\r\nb \n  c\t\td",
            "12345 1 22 333",
            "x = foo(bar) + 3.14159;\n\treturn",
            "日本語のテキスト、句読点。",
            "e\u{301}\u{302} cafe\u{301}!!\n",
            "👩\u{200d}💻 emoji 🎉🎉 ",
            "   \u{3000}\u{a0}x\u{2028}y\u{85}",
            "''''s '' 'l 'll",
            "\u{10ffff}\u{e000}\u{fffd}",
        ] {
            both(text);
        }
    }

    #[test]
    fn all_pairs_of_interesting_chars() {
        let chars: Vec<char> =
            "a'sSlLvVeErRdDmMtT1٣ \t\r\n\u{a0}\u{3000}.!\u{301}日ſK_\u{85}\u{2029}"
                .chars()
                .collect();
        for &a in &chars {
            for &b in &chars {
                for &c in &chars {
                    let s: String = [a, b, c, a].iter().collect();
                    both(&s);
                }
            }
        }
    }
}
