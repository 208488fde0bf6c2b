//! The trained tokenizer: vocabulary, merges, encoding and decoding.

use crate::split::Splitter;
use ahash::AHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

pub struct Core {
    pub pattern: String,
    pub splitter: Splitter,
    /// Non-special tokens, index = id. A bijection bytes <-> id.
    pub vocab: Vec<Vec<u8>>,
    /// (left, right, new) in rank order. A pair may repeat (see `rank_merges`).
    pub merges: Vec<(u32, u32, u32)>,
    /// pair -> (rank, new id). When a pair occurs more than once in `merges` the first
    /// (lowest) rank wins; later repeats can never fire during encoding.
    merge_map: AHashMap<u64, (u32, u32)>,
    /// Special tokens; special `i` has id `vocab.len() + i`.
    pub specials: Vec<String>,
    byte_ids: [u32; 256],
}

/// Chunks longer than this (in bytes) are merged with a heap instead of linear scans.
const HEAP_THRESHOLD: usize = 96;

impl Core {
    pub fn new(
        pattern: String,
        splitter: Splitter,
        vocab: Vec<Vec<u8>>,
        merges: Vec<(u32, u32, u32)>,
        specials: Vec<String>,
    ) -> Result<Core, String> {
        let mut index: AHashMap<&[u8], u32> = AHashMap::with_capacity(vocab.len());
        for (i, t) in vocab.iter().enumerate() {
            if t.is_empty() {
                return Err(format!("token {i} is empty"));
            }
            if let Some(j) = index.insert(t.as_slice(), i as u32) {
                return Err(format!("tokens {j} and {i} have the same bytes {t:?}"));
            }
        }
        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            byte_ids[b as usize] = *index
                .get(&[b][..])
                .ok_or_else(|| format!("the vocabulary lacks the single byte {b:#04x}"))?;
        }
        let n = vocab.len() as u32;
        let mut merge_map = AHashMap::with_capacity(merges.len());
        for (rank, &(l, r, m)) in merges.iter().enumerate() {
            if l >= n || r >= n || m >= n {
                return Err(format!(
                    "merge {rank} ({l}, {r}) -> {m} refers to a missing token"
                ));
            }
            let (lb, rb, mb) = (&vocab[l as usize], &vocab[r as usize], &vocab[m as usize]);
            if mb.len() != lb.len() + rb.len()
                || mb[..lb.len()] != lb[..]
                || mb[lb.len()..] != rb[..]
            {
                return Err(format!(
                    "merge {rank}: token {m} is not token {l} + token {r}"
                ));
            }
            merge_map.entry(pack(l, r)).or_insert((rank as u32, m));
        }
        let mut seen = ahash::AHashSet::new();
        for s in &specials {
            if s.is_empty() {
                return Err("special tokens must not be empty".into());
            }
            if !seen.insert(s.as_str()) {
                return Err(format!("duplicate special token {s:?}"));
            }
        }
        Ok(Core {
            pattern,
            splitter,
            vocab,
            merges,
            merge_map,
            specials,
            byte_ids,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len() + self.specials.len()
    }

    /// Merges with their first rank only (what encoding uses; also what the HF export holds).
    pub fn rank_merges(&self) -> Vec<(u32, u32, u32)> {
        self.merges
            .iter()
            .enumerate()
            .filter(|&(rank, &(l, r, _))| self.merge_map[&pack(l, r)].0 == rank as u32)
            .map(|(_, &m)| m)
            .collect()
    }

    pub fn special_id(&self, i: usize) -> u32 {
        (self.vocab.len() + i) as u32
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        if id < self.vocab.len() {
            Some(&self.vocab[id])
        } else {
            self.specials
                .get(id - self.vocab.len())
                .map(|s| s.as_bytes())
        }
    }

    #[inline]
    fn rank(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merge_map.get(&pack(a, b)).copied()
    }

    /// BPE on one chunk: repeatedly merge the adjacent pair with the lowest merge rank
    /// (leftmost on ties). Same result as HF `tokenizers` BPE.
    pub fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        match chunk.len() {
            0 => {}
            1 => out.push(self.byte_ids[chunk[0] as usize]),
            n if n <= HEAP_THRESHOLD => self.encode_chunk_scan(chunk, out),
            _ => self.encode_chunk_heap(chunk, out),
        }
    }

    fn encode_chunk_scan(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = chunk.iter().map(|&b| self.byte_ids[b as usize]).collect();
        // ranks[k] = (rank, new id) of pair (syms[k], syms[k+1])
        let mut ranks: Vec<(u32, u32)> = syms
            .windows(2)
            .map(|w| self.rank(w[0], w[1]).unwrap_or((u32::MAX, 0)))
            .collect();
        loop {
            let mut best = u32::MAX;
            let mut pos = 0;
            for (k, &(r, _)) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    pos = k;
                }
            }
            if best == u32::MAX {
                break;
            }
            syms[pos] = ranks[pos].1;
            syms.remove(pos + 1);
            ranks.remove(pos);
            if pos > 0 {
                ranks[pos - 1] = self.rank(syms[pos - 1], syms[pos]).unwrap_or((u32::MAX, 0));
            }
            if pos < ranks.len() {
                ranks[pos] = self.rank(syms[pos], syms[pos + 1]).unwrap_or((u32::MAX, 0));
            }
        }
        out.extend_from_slice(&syms);
    }

    fn encode_chunk_heap(&self, chunk: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = chunk.len();
        let mut id: Vec<u32> = chunk.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut next: Vec<usize> = (0..n)
            .map(|i| if i + 1 == n { NONE } else { i + 1 })
            .collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::new();
        for k in 0..n - 1 {
            if let Some((r, _)) = self.rank(id[k], id[k + 1]) {
                heap.push(Reverse((r, k)));
            }
        }
        while let Some(Reverse((r, p))) = heap.pop() {
            if !alive[p] {
                continue;
            }
            let q = next[p];
            if q == NONE {
                continue;
            }
            // A rank belongs to exactly one pair, so equal rank means the entry is current.
            let Some((r2, new)) = self.rank(id[p], id[q]) else {
                continue;
            };
            if r2 != r {
                continue;
            }
            id[p] = new;
            alive[q] = false;
            let nq = next[q];
            next[p] = nq;
            if nq != NONE {
                prev[nq] = p;
                if let Some((r3, _)) = self.rank(new, id[nq]) {
                    heap.push(Reverse((r3, p)));
                }
            }
            let pp = prev[p];
            if pp != NONE {
                if let Some((r3, _)) = self.rank(id[pp], new) {
                    heap.push(Reverse((r3, pp)));
                }
            }
        }
        let mut k = 0;
        while k != NONE {
            out.push(id[k]);
            k = next[k];
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.splitter
            .for_each(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }

    /// Like `encode`, memoising chunk encodings in `cache` (cleared when it gets large).
    pub fn encode_cached(
        &self,
        text: &str,
        cache: &mut AHashMap<Box<[u8]>, Box<[u32]>>,
    ) -> Result<Vec<u32>, String> {
        const MAX_CACHE: usize = 1 << 17;
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.splitter.for_each(text, |chunk| {
            let b = chunk.as_bytes();
            if b.len() == 1 {
                out.push(self.byte_ids[b[0] as usize]);
                return;
            }
            if let Some(ids) = cache.get(b) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            self.encode_chunk(b, &mut out);
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
            cache.insert(b.into(), out[start..].into());
        })?;
        Ok(out)
    }

    pub fn decode_bytes(&self, ids: &[i64]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let t = if (0..u32::MAX as i64).contains(&id) {
                self.token_bytes(id as u32)
            } else {
                None
            };
            match t {
                Some(b) => out.extend_from_slice(b),
                None => {
                    return Err(format!(
                        "token id {id} is out of range (vocab size {})",
                        self.vocab_size()
                    ))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::DEFAULT_PATTERN;
    use crate::train::{train_merges, ChunkCounter};

    #[test]
    fn scan_and_heap_agree() {
        let sp = Splitter::new(DEFAULT_PATTERN, false).unwrap();
        let mut cc = ChunkCounter::new();
        let docs: Vec<String> = (0..200)
            .map(|i| format!("{}abab aaaaaa  ....!!!  xyxyxyx{}", "ab".repeat(i % 7), i))
            .collect();
        cc.add_docs(&sp, &docs).unwrap();
        let t = train_merges(cc.into_words(), 256 + 60);
        let core = Core::new(DEFAULT_PATTERN.into(), sp, t.vocab, t.merges, vec![]).unwrap();
        let mut seed = 12345u64;
        for len in 2..200 {
            for _ in 0..20 {
                let chunk: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        b"ab .!xy"[(seed >> 33) as usize % 7]
                    })
                    .collect();
                let (mut x, mut y) = (vec![], vec![]);
                core.encode_chunk_scan(&chunk, &mut x);
                core.encode_chunk_heap(&chunk, &mut y);
                assert_eq!(x, y);
                let back: Vec<u8> = x
                    .iter()
                    .flat_map(|&i| core.vocab[i as usize].clone())
                    .collect();
                assert_eq!(back, chunk);
            }
        }
    }
}
