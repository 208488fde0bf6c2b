//! BPE training: chunk counting (parallel) and the incremental merge loop.
//!
//! Training works on the *unique* chunks of the corpus with their counts ("words").
//!
//! Merge selection: the pair with the highest count is merged next; ties are broken by the
//! smallest `(left_id, right_id)`. Pair counts count every adjacent position of every word
//! (times the word's count), i.e. exactly what a full recount would give. A merge is applied
//! inside a word left to right without overlap ("aaaa" with (a,a) -> "AA AA").
//!
//! If the merged bytes already exist as a token (two different pairs can spell the same
//! bytes), the merge is recorded with the EXISTING id and does not use up vocabulary space
//! (as HF's BpeTrainer does), so the vocabulary stays a bijection bytes <-> id.

use crate::split::Splitter;
use ahash::{AHashMap, RandomState};
use dary_heap::QuaternaryHeap;
use hashbrown::HashTable;
use rayon::prelude::*;
use std::cmp::Ordering;

const N_SHARDS: usize = 16;

fn shard_of(hash: u64) -> usize {
    // Middle bits: hashbrown uses the low bits for the bucket and the top 7 bits as tag.
    ((hash >> 40) as usize) & (N_SHARDS - 1)
}

fn fixed_hasher() -> RandomState {
    RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
}

#[derive(Clone, Copy)]
struct ChunkEntry {
    off: usize,
    len: u32,
    count: u64,
}

#[derive(Default)]
struct Shard {
    arena: Vec<u8>,
    table: HashTable<ChunkEntry>,
}

impl Shard {
    #[inline]
    fn add(&mut self, hs: &RandomState, hash: u64, chunk: &[u8], count: u64) {
        let Shard { arena, table } = self;
        if let Some(e) = table.find_mut(hash, |e| &arena[e.off..e.off + e.len as usize] == chunk) {
            e.count += count;
            return;
        }
        let off = arena.len();
        arena.extend_from_slice(chunk);
        table.insert_unique(
            hash,
            ChunkEntry {
                off,
                len: chunk.len() as u32,
                count,
            },
            |e| hs.hash_one(&arena[e.off..e.off + e.len as usize]),
        );
    }
}

/// One piece's chunk counts: a table per shard, plus the number of chunks seen.
type LocalCounts<'a> = (Vec<HashTable<LocalEntry<'a>>>, u64);

struct LocalEntry<'a> {
    hash: u64,
    chunk: &'a [u8],
    count: u64,
}

/// Global chunk -> count map, sharded by hash so that buffers can be merged in parallel.
/// Chunk bytes live in one arena per shard.
pub struct ChunkCounter {
    hs: RandomState,
    shards: Vec<Shard>,
    /// Total number of chunks seen (with multiplicity).
    pub total_chunks: u64,
}

impl Default for ChunkCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkCounter {
    pub fn new() -> Self {
        ChunkCounter {
            hs: fixed_hasher(),
            shards: (0..N_SHARDS).map(|_| Shard::default()).collect(),
            total_chunks: 0,
        }
    }

    pub fn unique_chunks(&self) -> usize {
        self.shards.iter().map(|s| s.table.len()).sum()
    }

    /// Pre-split `docs` in parallel and add their chunks to the counts.
    pub fn add_docs<S: AsRef<str> + Sync>(
        &mut self,
        splitter: &Splitter,
        docs: &[S],
    ) -> Result<(), String> {
        if docs.is_empty() {
            return Ok(());
        }
        let hs = &self.hs;
        let pieces = (rayon::current_num_threads() * 4).max(1);
        let piece_len = docs.len().div_ceil(pieces).max(1);
        // Each piece counts its chunks in per-shard tables whose keys borrow from `docs`.
        let locals: Vec<Result<LocalCounts, String>> = docs
            .par_chunks(piece_len)
            .map(|piece| {
                let mut tables: Vec<HashTable<LocalEntry>> =
                    (0..N_SHARDS).map(|_| HashTable::new()).collect();
                let mut n = 0u64;
                for doc in piece {
                    splitter.for_each(doc.as_ref(), |chunk| {
                        let chunk = chunk.as_bytes();
                        let hash = hs.hash_one(chunk);
                        let t = &mut tables[shard_of(hash)];
                        match t.find_mut(hash, |e| e.chunk == chunk) {
                            Some(e) => e.count += 1,
                            None => {
                                t.insert_unique(
                                    hash,
                                    LocalEntry {
                                        hash,
                                        chunk,
                                        count: 1,
                                    },
                                    |e| e.hash,
                                );
                            }
                        }
                        n += 1;
                    })?;
                }
                Ok((tables, n))
            })
            .collect();
        let mut ok = Vec::with_capacity(locals.len());
        for l in locals {
            let (tables, n) = l?;
            self.total_chunks += n;
            ok.push(tables);
        }
        self.shards
            .par_iter_mut()
            .enumerate()
            .for_each(|(si, shard)| {
                for tables in &ok {
                    for e in tables[si].iter() {
                        shard.add(hs, e.hash, e.chunk, e.count);
                    }
                }
            });
        Ok(())
    }

    /// Turn the counts into words (chunks of >= 2 bytes; shorter ones have no pairs).
    pub fn into_words(self) -> Words {
        let mut total_syms = 0usize;
        let mut n_words = 0usize;
        for sh in &self.shards {
            for e in sh.table.iter() {
                if e.len >= 2 {
                    total_syms += e.len as usize;
                    n_words += 1;
                }
            }
        }
        let mut w = Words {
            syms: Vec::with_capacity(total_syms),
            start: Vec::with_capacity(n_words),
            len: Vec::with_capacity(n_words),
            count: Vec::with_capacity(n_words),
        };
        for sh in self.shards {
            for e in sh.table.iter() {
                if e.len >= 2 {
                    w.start.push(w.syms.len());
                    w.len.push(e.len);
                    w.count.push(e.count as i64);
                    w.syms.extend(
                        sh.arena[e.off..e.off + e.len as usize]
                            .iter()
                            .map(|&b| b as u32),
                    );
                }
            }
            // shard (table + arena) dropped here, keeping peak memory low
        }
        w
    }
}

/// Unique chunks as token-id sequences, stored back to back in one array. Merges only
/// shrink a word, so each word is rewritten in place.
pub struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    pub fn from_chunks(chunks: &[(Vec<u8>, u64)]) -> Words {
        let mut w = Words {
            syms: vec![],
            start: vec![],
            len: vec![],
            count: vec![],
        };
        for (c, n) in chunks {
            if c.len() >= 2 {
                w.start.push(w.syms.len());
                w.len.push(c.len() as u32);
                w.count.push(*n as i64);
                w.syms.extend(c.iter().map(|&b| b as u32));
            }
        }
        w
    }

    fn n_words(&self) -> usize {
        self.start.len()
    }
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unpack(p: u64) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

#[derive(Default)]
struct PairInfo {
    count: i64,
    /// Words that contain (or once contained) the pair; may hold stale entries and
    /// duplicates, which are harmless (merging a word without the pair changes nothing).
    words: Vec<u32>,
}

#[derive(PartialEq, Eq)]
struct Cand {
    count: i64,
    pair: u64,
}

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        // max-heap: higher count first, then the smaller (left, right) pair
        self.count
            .cmp(&o.count)
            .then_with(|| o.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

type PairMap = AHashMap<u64, PairInfo>;

fn count_pairs(words: &Words) -> PairMap {
    let nw = words.n_words();
    let pieces = (rayon::current_num_threads() * 2).max(1);
    let step = nw.div_ceil(pieces).max(1);
    let mut maps: Vec<PairMap> = (0..nw)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| {
            let hi = (lo + step).min(nw);
            let mut m = PairMap::default();
            for w in lo..hi {
                let st = words.start[w];
                let s = &words.syms[st..st + words.len[w] as usize];
                let c = words.count[w];
                for k in 0..s.len() - 1 {
                    let e = m.entry(pack(s[k], s[k + 1])).or_default();
                    e.count += c;
                    if e.words.last() != Some(&(w as u32)) {
                        e.words.push(w as u32);
                    }
                }
            }
            m
        })
        .collect();
    let Some(big) = (0..maps.len()).max_by_key(|&i| maps[i].len()) else {
        return PairMap::default();
    };
    let mut base = maps.swap_remove(big);
    for m in maps {
        for (k, v) in m {
            let e = base.entry(k).or_default();
            e.count += v.count;
            e.words.extend_from_slice(&v.words);
        }
    }
    base
}

/// Result of training: the token byte strings (index = id; 0..256 are the single bytes)
/// and the merges `(left, right, new_id)` in rank order.
pub struct Trained {
    pub vocab: Vec<Vec<u8>>,
    pub merges: Vec<(u32, u32, u32)>,
}

/// Run merges until the vocabulary holds `target_tokens` tokens (bytes included) or no
/// pair with a positive count is left.
pub fn train_merges(mut words: Words, target_tokens: usize) -> Trained {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut index: AHashMap<Vec<u8>, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, v)| (v.clone(), i as u32))
        .collect();
    let mut merges = Vec::new();
    if vocab.len() >= target_tokens {
        return Trained { vocab, merges };
    }

    let t0 = std::time::Instant::now();
    let mut pairs = count_pairs(&words);
    crate::log(format_args!(
        "counted {} pairs in {} words in {:.2?}",
        pairs.len(),
        words.n_words(),
        t0.elapsed()
    ));
    let mut heap: QuaternaryHeap<Cand> = pairs
        .iter()
        .filter(|(_, v)| v.count > 0)
        .map(|(&pair, v)| Cand {
            count: v.count,
            pair,
        })
        .collect();
    let mut added: Vec<u64> = Vec::new();

    while vocab.len() < target_tokens {
        let Some(top) = heap.pop() else { break };
        let cur = pairs.get(&top.pair).map_or(0, |p| p.count);
        if cur != top.count {
            // Lazy refresh. Counts only ever go up together with a fresh push, so an entry
            // below the current count is a leftover and can be dropped.
            if cur > 0 && top.count > cur {
                heap.push(Cand {
                    count: cur,
                    pair: top.pair,
                });
            }
            continue;
        }
        let pair = top.pair;
        let (a, b) = unpack(pair);
        let mut nb = Vec::with_capacity(vocab[a as usize].len() + vocab[b as usize].len());
        nb.extend_from_slice(&vocab[a as usize]);
        nb.extend_from_slice(&vocab[b as usize]);
        let new_id = match index.get(&nb) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                index.insert(nb.clone(), id);
                vocab.push(nb);
                id
            }
        };
        merges.push((a, b, new_id));

        let mut ws = pairs.remove(&pair).map(|p| p.words).unwrap_or_default();
        ws.sort_unstable();
        ws.dedup();
        added.clear();
        for &w in &ws {
            merge_word(&mut words, w, a, b, new_id, &mut pairs, &mut added);
        }
        added.sort_unstable();
        added.dedup();
        for &p in &added {
            if let Some(info) = pairs.get(&p) {
                if info.count > 0 {
                    heap.push(Cand {
                        count: info.count,
                        pair: p,
                    });
                }
            }
        }
    }
    crate::log(format_args!(
        "{} merges in {:.2?}",
        merges.len(),
        t0.elapsed()
    ));
    Trained { vocab, merges }
}

#[inline(always)]
fn dec(pairs: &mut PairMap, p: u64, c: i64) {
    if let Some(e) = pairs.get_mut(&p) {
        e.count -= c;
        debug_assert!(e.count >= 0);
        if e.count <= 0 {
            pairs.remove(&p);
        }
    } else {
        debug_assert!(false, "decrementing a missing pair");
    }
}

#[inline(always)]
fn inc(pairs: &mut PairMap, added: &mut Vec<u64>, p: u64, c: i64, w: u32) {
    let e = pairs.entry(p).or_default();
    e.count += c;
    if e.words.last() != Some(&w) {
        e.words.push(w);
    }
    added.push(p);
}

/// Apply merge (a, b) -> new in word `w` (left to right, no overlap), updating pair counts
/// with the exact local changes.
fn merge_word(
    words: &mut Words,
    w: u32,
    a: u32,
    b: u32,
    new: u32,
    pairs: &mut PairMap,
    added: &mut Vec<u64>,
) {
    let wi = w as usize;
    let st = words.start[wi];
    let n = words.len[wi] as usize;
    let c = words.count[wi];
    let s = &mut words.syms[st..st + n];
    let merged = pack(a, b);
    let (mut i, mut j) = (0usize, 0usize);
    let mut changed = false;
    while i < n {
        if i + 1 < n && s[i] == a && s[i + 1] == b {
            changed = true;
            if j > 0 {
                // s[j-1] is the already rewritten left neighbour
                let x = s[j - 1];
                let old = pack(x, a);
                if old != merged {
                    dec(pairs, old, c);
                }
                inc(pairs, added, pack(x, new), c, w);
            }
            if i + 2 < n {
                let y = s[i + 2];
                let old = pack(b, y);
                if old != merged {
                    dec(pairs, old, c);
                }
                inc(pairs, added, pack(new, y), c, w);
            }
            s[j] = new;
            j += 1;
            i += 2;
        } else {
            s[j] = s[i];
            j += 1;
            i += 1;
        }
    }
    if changed {
        words.len[wi] = j as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: full recount each merge.
    fn naive(chunks: &[(Vec<u8>, u64)], target: usize) -> Vec<(u32, u32, u32)> {
        let mut words: Vec<(Vec<u32>, i64)> = chunks
            .iter()
            .map(|(c, n)| (c.iter().map(|&b| b as u32).collect(), *n as i64))
            .collect();
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merges = vec![];
        while vocab.len() < target {
            let mut pc: std::collections::BTreeMap<(u32, u32), i64> = Default::default();
            for (s, c) in &words {
                for k in 1..s.len() {
                    *pc.entry((s[k - 1], s[k])).or_default() += c;
                }
            }
            let Some((&(a, b), &cnt)) = pc
                .iter()
                .max_by(|x, y| x.1.cmp(y.1).then_with(|| y.0.cmp(x.0)))
            else {
                break;
            };
            if cnt <= 0 {
                break;
            }
            let mut nb = vocab[a as usize].clone();
            nb.extend_from_slice(&vocab[b as usize]);
            let id = match vocab.iter().position(|v| *v == nb) {
                Some(i) => i as u32,
                None => {
                    vocab.push(nb);
                    (vocab.len() - 1) as u32
                }
            };
            merges.push((a, b, id));
            for (s, _) in &mut words {
                let mut out = vec![];
                let mut i = 0;
                while i < s.len() {
                    if i + 1 < s.len() && s[i] == a && s[i + 1] == b {
                        out.push(id);
                        i += 2;
                    } else {
                        out.push(s[i]);
                        i += 1;
                    }
                }
                *s = out;
            }
        }
        merges
    }

    fn chunks_of(texts: &[&str]) -> Vec<(Vec<u8>, u64)> {
        let sp = Splitter::new(crate::split::DEFAULT_PATTERN, false).unwrap();
        let mut m: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
        for t in texts {
            sp.for_each(t, |c| *m.entry(c.as_bytes().to_vec()).or_default() += 1)
                .unwrap();
        }
        m.into_iter().collect()
    }

    #[test]
    fn matches_naive() {
        let corpora: Vec<Vec<&str>> = vec![
            vec!["aaaa aaaa aaa aa a aaaaaaa", "abab ababab ba"],
            vec!["abc abc abc bcd bcd abcd", "xabc xbc"],
            vec!["the cat sat on the mat with the hat; the end 12345 1212 \n\n  \t"],
        ];
        for texts in corpora {
            let chunks = chunks_of(&texts);
            for target in [256, 260, 270, 300] {
                let want = naive(&chunks, target);
                let got = train_merges(Words::from_chunks(&chunks), target);
                assert_eq!(got.merges, want, "texts {texts:?} target {target}");
            }
        }
    }

    #[test]
    fn counter_counts() {
        let sp = Splitter::new(crate::split::DEFAULT_PATTERN, false).unwrap();
        let mut cc = ChunkCounter::new();
        let docs: Vec<String> = (0..100).map(|i| format!("hello world {i}")).collect();
        cc.add_docs(&sp, &docs).unwrap();
        assert_eq!(cc.total_chunks, 400); // "hello", " world", " ", digits
        assert_eq!(cc.unique_chunks(), 2 + 1 + 100);
    }
}
