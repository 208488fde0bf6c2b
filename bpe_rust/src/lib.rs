//! `bpe_rust`: byte-level BPE tokenizer training for nanostudio (PyO3 extension).
//!
//! See the `Tokenizer` docstring for the Python API.

pub mod core;
pub mod export;
pub mod split;
pub mod train;

use crate::core::Core;
use crate::split::{Splitter, DEFAULT_PATTERN};
use ahash::AHashMap;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use rayon::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The default special tokens (appended after the merged tokens).
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// Progress/timing lines on stderr when the environment variable BPE_RUST_LOG is set.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("BPE_RUST_LOG").is_some()) {
        eprintln!("[bpe_rust] {args}");
    }
}

fn value_err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Run `f`, turning a Rust panic into a Python RuntimeError instead of a PanicException.
fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "bpe_rust internal error: {msg}"
            )))
        }
    }
}

fn check_specials(specials: &[String]) -> PyResult<()> {
    let mut seen = ahash::AHashSet::new();
    for (i, s) in specials.iter().enumerate() {
        if s.is_empty() {
            return Err(value_err(format!(
                "special_tokens[{i}] is empty; special tokens must be non-empty strings"
            )));
        }
        if !seen.insert(s.as_str()) {
            return Err(value_err(format!(
                "duplicate special token {s:?} in special_tokens"
            )));
        }
    }
    Ok(())
}

/// Byte-level BPE tokenizer.
///
/// Train with ``Tokenizer.train(texts, vocab_size, pattern=None, special_tokens=None,
/// buffer_size=8192)``:
///
/// * ``texts``: any iterable of ``str`` documents. It is drained ``buffer_size`` documents at
///   a time while holding the GIL; each buffer is then pre-split and counted in parallel
///   (rayon) with the GIL released.
/// * ``vocab_size``: the TOTAL vocabulary size: 256 byte tokens + merged tokens + specials.
/// * ``pattern``: the split regex (default ``DEFAULT_PATTERN``, for which a hand-written
///   splitter producing exactly the regex's chunks is used; other patterns go through
///   fancy-regex). Text between regex matches becomes a chunk of its own (HF "Isolated").
/// * ``special_tokens``: list of strings (default ``SPECIAL_TOKENS``).
///
/// Merge rule: the pair with the highest count (over all adjacent positions of all chunks)
/// is merged next; ties go to the smallest ``(left_id, right_id)``. A merge is applied left
/// to right without overlap. If the merged bytes already exist as a token (two pairs can
/// spell the same bytes), the merge is recorded with the EXISTING id and uses no vocabulary
/// space (as HF's BpeTrainer does), so ``len(merges)`` can exceed the number of merged
/// tokens, and a pair may even be recorded twice (only its first rank is used to encode and
/// exported). Training stops when the vocabulary is full or no pair is left; ids are
/// 0..255 for the bytes, then the merged tokens, then the specials. When training runs out
/// of pairs early, the specials directly follow the last merged token and ``vocab_size`` is
/// smaller than requested.
///
/// ``encode`` treats special-token strings as ordinary text. The HF export
/// (``to_hf_json``/``save_hf``) encodes exactly like ``encode`` when loaded with
/// ``tokenizers.Tokenizer.from_str``/``from_file`` and ``tok.encode_special_tokens = True``
/// (otherwise HF turns literal "<|bos|>" text into the special id).
#[pyclass(frozen, module = "bpe_rust", name = "Tokenizer")]
pub struct Tokenizer {
    core: Core,
}

#[pymethods]
impl Tokenizer {
    /// Train on an iterable of str. ``vocab_size`` counts the 256 bytes, the merged tokens
    /// and the special tokens. Raises ValueError (empty corpus, vocab_size too small, bad
    /// regex, duplicate or empty special tokens, buffer_size < 1) or TypeError (texts not an
    /// iterable of str). See the class docstring for the merge rules.
    #[staticmethod]
    #[pyo3(signature = (texts, vocab_size, pattern=None, special_tokens=None, buffer_size=8192))]
    fn train(
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        vocab_size: i64,
        pattern: Option<String>,
        special_tokens: Option<Vec<String>>,
        buffer_size: i64,
    ) -> PyResult<Tokenizer> {
        let specials: Vec<String> = special_tokens
            .unwrap_or_else(|| SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect());
        check_specials(&specials)?;
        let min_vocab = 256 + specials.len() as i64;
        if vocab_size < min_vocab {
            return Err(value_err(format!(
                "vocab_size={vocab_size} is too small: it must be at least 256 (bytes) + {} (special tokens) = {min_vocab}",
                specials.len()
            )));
        }
        if buffer_size < 1 {
            return Err(value_err(format!(
                "buffer_size must be >= 1, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern, false).map_err(value_err)?;
        if texts.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "texts must be an iterable of str documents, not a single str (wrap it in a list)",
            ));
        }
        let iter = texts.try_iter().map_err(|e| {
            PyTypeError::new_err(format!(
                "texts must be an iterable of str, got {}: {e}",
                texts
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;

        let t_start = std::time::Instant::now();
        let mut counter = train::ChunkCounter::new();
        // The buffer keeps the str objects alive; their UTF-8 data is borrowed, not copied,
        // while the GIL is released.
        let cap = buffer_size.min(1 << 20) as usize;
        let mut buf: Vec<Bound<'_, PyString>> = Vec::with_capacity(cap);
        let mut index = 0usize;
        let mut iter = iter.into_iter();
        let mut drain_time = std::time::Duration::ZERO;
        loop {
            let t_drain = std::time::Instant::now();
            buf.clear();
            while buf.len() < buffer_size as usize {
                let Some(item) = iter.next() else { break };
                let item = item?;
                let s = item.cast_into::<PyString>().map_err(|e| {
                    let tname = e
                        .into_inner()
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into());
                    PyTypeError::new_err(format!(
                        "texts item {index} is of type {tname}, expected str"
                    ))
                })?;
                buf.push(s);
                index += 1;
            }
            if buf.is_empty() {
                break;
            }
            let first = index - buf.len();
            let strs: Vec<&str> = buf
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.to_str().map_err(|e| {
                        value_err(format!("texts item {} is not valid text: {e}", first + i))
                    })
                })
                .collect::<PyResult<_>>()?;
            drain_time += t_drain.elapsed();
            let res = py.detach(|| guard(|| counter.add_docs(&splitter, &strs).map_err(value_err)));
            res?;
            py.check_signals()?;
        }
        drop(buf);
        log(format_args!(
            "ingested {index} texts: {} chunks, {} unique, in {:.2?} ({:.2?} draining the iterator)",
            counter.total_chunks,
            counter.unique_chunks(),
            t_start.elapsed(),
            drain_time
        ));
        if counter.total_chunks == 0 {
            return Err(value_err(format!(
                "empty corpus: the {index} text(s) given contain no characters to train on"
            )));
        }
        let target = (vocab_size as usize) - specials.len();
        let trained =
            py.detach(|| guard(|| Ok(train::train_merges(counter.into_words(), target))))?;
        let core = Core::new(pattern, splitter, trained.vocab, trained.merges, specials)
            .map_err(|e| PyRuntimeError::new_err(format!("bpe_rust internal error: {e}")))?;
        Ok(Tokenizer { core })
    }

    /// Rebuild a tokenizer from a tokenizer.json string written by ``to_hf_json``.
    #[staticmethod]
    fn from_hf_json(s: &str) -> PyResult<Tokenizer> {
        guard(|| {
            export::from_hf_json(s)
                .map(|core| Tokenizer { core })
                .map_err(|e| value_err(format!("cannot load tokenizer.json: {e}")))
        })
    }

    /// Load a tokenizer.json file written by ``save_hf``.
    #[staticmethod]
    fn load(path: std::path::PathBuf) -> PyResult<Tokenizer> {
        let s = std::fs::read_to_string(&path)?;
        Self::from_hf_json(&s)
    }

    #[getter]
    fn pattern(&self) -> &str {
        &self.core.pattern
    }

    #[getter]
    fn special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (i, s) in self.core.specials.iter().enumerate() {
            d.set_item(s, self.core.special_id(i))?;
        }
        Ok(d)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.core.vocab_size()
    }

    /// Merges ``(left_id, right_id, new_id)`` in rank order.
    #[getter]
    fn merges(&self) -> Vec<(u32, u32, u32)> {
        self.core.merges.clone()
    }

    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyBytes>> {
        let b = u32::try_from(id)
            .ok()
            .and_then(|i| self.core.token_bytes(i))
            .ok_or_else(|| {
                value_err(format!(
                    "token id {id} is out of range (vocab size {})",
                    self.core.vocab_size()
                ))
            })?;
        Ok(PyBytes::new(py, b))
    }

    /// All tokens' bytes, index = id (specials as their UTF-8 text).
    fn vocab<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<Bound<'py, PyBytes>> = (0..self.core.vocab_size() as u32)
            .map(|i| PyBytes::new(py, self.core.token_bytes(i).unwrap()))
            .collect();
        PyList::new(py, items)
    }

    /// tiktoken-style ``[(token_bytes, rank)]`` for every non-special token (rank = id).
    fn mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<Bound<'py, PyTuple>> = self
            .core
            .vocab
            .iter()
            .enumerate()
            .map(|(i, t)| {
                PyTuple::new(
                    py,
                    [
                        PyBytes::new(py, t).into_any(),
                        i.into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect::<PyResult<_>>()?;
        PyList::new(py, items)
    }

    /// Encode ordinary text (special-token strings are not recognised).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let core = &self.core;
        py.detach(|| guard(|| core.encode(text).map_err(value_err)))
    }

    /// Encode many texts in parallel (rayon) with the GIL released.
    fn encode_batch(&self, py: Python<'_>, texts: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u32>>> {
        if texts.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "encode_batch expects a list of str, not a str",
            ));
        }
        let objs: Vec<Bound<'_, PyAny>> = texts.try_iter()?.collect::<PyResult<_>>()?;
        let mut strs: Vec<&str> = Vec::with_capacity(objs.len());
        for (i, o) in objs.iter().enumerate() {
            let s = o
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err(format!("texts item {i} is not a str")))?;
            strs.push(s.to_str()?);
        }
        let core = &self.core;
        py.detach(|| {
            guard(|| {
                let pieces = (rayon::current_num_threads() * 4).max(1);
                let step = strs.len().div_ceil(pieces).max(1);
                let parts: Vec<Result<Vec<Vec<u32>>, String>> = strs
                    .par_chunks(step)
                    .map(|part| {
                        let mut cache = AHashMap::new();
                        part.iter()
                            .map(|t| core.encode_cached(t, &mut cache))
                            .collect()
                    })
                    .collect();
                let mut out = Vec::with_capacity(strs.len());
                for p in parts {
                    out.extend(p.map_err(value_err)?);
                }
                Ok(out)
            })
        })
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.core.decode_bytes(&ids).map_err(value_err)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Decode to str (invalid UTF-8 is replaced with U+FFFD).
    fn decode(&self, ids: Vec<i64>) -> PyResult<String> {
        let b = self.core.decode_bytes(&ids).map_err(value_err)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// HF ``tokenizers`` tokenizer.json. Load it with ``tokenizers.Tokenizer.from_str`` and
    /// set ``encode_special_tokens = True`` to encode exactly like ``encode``.
    fn to_hf_json(&self) -> String {
        export::to_hf_json(&self.core)
    }

    fn save_hf(&self, path: std::path::PathBuf) -> PyResult<()> {
        std::fs::write(&path, export::to_hf_json(&self.core))?;
        Ok(())
    }

    /// Write the non-special tokens as "<base64 bytes> <rank>" lines (tiktoken format).
    fn save_tiktoken(&self, path: std::path::PathBuf) -> PyResult<()> {
        std::fs::write(&path, export::to_tiktoken(&self.core))?;
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.core.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, merges={}, specials={}, pattern={})",
            self.core.vocab_size(),
            self.core.merges.len(),
            self.core.specials.len(),
            if self.core.pattern == DEFAULT_PATTERN {
                "DEFAULT_PATTERN".to_string()
            } else {
                format!("{:?}", self.core.pattern)
            }
        )
    }

    /// Pickle support (through the HF JSON).
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let f = py.get_type::<Tokenizer>().getattr("from_hf_json")?;
        Ok((f, (export::to_hf_json(&self.core),)))
    }
}

/// Pre-split ``text`` into chunks with ``pattern`` (default DEFAULT_PATTERN, through the
/// fast hand-written splitter unless ``force_regex`` is true).
#[pyfunction(name = "split")]
#[pyo3(signature = (text, pattern=None, force_regex=false))]
fn py_split(
    py: Python<'_>,
    text: &str,
    pattern: Option<&str>,
    force_regex: bool,
) -> PyResult<Vec<String>> {
    let sp = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN), force_regex).map_err(value_err)?;
    let chunks = py.detach(|| {
        sp.split(text)
            .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
    });
    chunks.map_err(value_err)
}

/// Byte-level BPE tokenizer training in Rust (nanostudio).
///
/// * ``Tokenizer.train(texts, vocab_size, pattern=None, special_tokens=None, buffer_size=8192)``
/// * ``split(text, pattern=None, force_regex=False)``: the pre-split chunks
/// * ``DEFAULT_PATTERN``: GPT-4 split regex with 1-2 digit number groups
/// * ``SPECIAL_TOKENS``: the nine default special tokens
///
/// Set the environment variable ``BPE_RUST_LOG`` to print phase timings to stderr;
/// ``RAYON_NUM_THREADS`` sets the number of threads.
#[pymodule]
fn bpe_rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("SPECIAL_TOKENS", SPECIAL_TOKENS.to_vec())?;
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(py_split, m)?)?;
    Ok(())
}
