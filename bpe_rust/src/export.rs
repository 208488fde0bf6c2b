//! Export to / import from HF `tokenizers` tokenizer.json and tiktoken's `.tiktoken` format.

use crate::core::Core;
use crate::split::Splitter;
use base64::Engine;
use serde_json::{json, Map, Value};

/// The byte-level alphabet of GPT-2: printable Latin-1 bytes stand for themselves, the
/// remaining 68 bytes are given the code points 256, 257, ... in byte order.
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    out
}

fn to_unicode(table: &[char; 256], bytes: &[u8]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

fn from_unicode(inverse: &ahash::AHashMap<char, u8>, s: &str) -> Result<Vec<u8>, String> {
    s.chars()
        .map(|c| {
            inverse.get(&c).copied().ok_or_else(|| {
                format!("token {s:?} has a char {c:?} outside the byte-level alphabet")
            })
        })
        .collect()
}

pub fn to_hf_json(core: &Core) -> String {
    let table = byte_chars();
    let mut vocab = Map::with_capacity(core.vocab.len());
    for (id, t) in core.vocab.iter().enumerate() {
        vocab.insert(to_unicode(&table, t), Value::from(id));
    }
    let merges: Vec<Value> = core
        .rank_merges()
        .iter()
        .map(|&(l, r, _)| {
            json!([
                to_unicode(&table, &core.vocab[l as usize]),
                to_unicode(&table, &core.vocab[r as usize])
            ])
        })
        .collect();
    let added: Vec<Value> = core
        .specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "id": core.special_id(i),
                "content": s,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true
            })
        })
        .collect();
    let v = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": core.pattern},
                    "behavior": "Isolated",
                    "invert": false
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": false,
                    "use_regex": false
                }
            ]
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": Value::Object(vocab),
            "merges": merges
        }
    });
    serde_json::to_string(&v).expect("serialising JSON cannot fail")
}

fn find_split_pattern(pre: &Value) -> Option<String> {
    match pre.get("type")?.as_str()? {
        "Split" => pre.get("pattern")?.get("Regex")?.as_str().map(String::from),
        "Sequence" => pre
            .get("pretokenizers")?
            .as_array()?
            .iter()
            .find_map(find_split_pattern),
        _ => None,
    }
}

/// Rebuild a tokenizer from a tokenizer.json in the layout `to_hf_json` writes (byte-level
/// BPE, a Split(Regex) pre-tokenizer, specials as added tokens after the vocabulary).
pub fn from_hf_json(s: &str) -> Result<Core, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
    let model = v.get("model").ok_or("tokenizer.json has no \"model\"")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err("only BPE models are supported".into());
    }
    let pattern = v
        .get("pre_tokenizer")
        .and_then(find_split_pattern)
        .ok_or("no Split(Regex) pre-tokenizer found in tokenizer.json")?;
    let splitter = Splitter::new(&pattern, false)?;

    let table = byte_chars();
    let inverse: ahash::AHashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let vmap = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("model.vocab must be an object")?;
    let mut vocab: Vec<Option<Vec<u8>>> = vec![None; vmap.len()];
    let mut by_str: ahash::AHashMap<&str, u32> = ahash::AHashMap::with_capacity(vmap.len());
    for (tok, id) in vmap {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < vmap.len())
            .ok_or_else(|| format!("token {tok:?} has id {id}, expected 0..{}", vmap.len()))?;
        if vocab[id as usize].is_some() {
            return Err(format!("id {id} is used twice in model.vocab"));
        }
        vocab[id as usize] = Some(from_unicode(&inverse, tok)?);
        by_str.insert(tok.as_str(), id as u32);
    }
    let vocab: Vec<Vec<u8>> = vocab.into_iter().map(|t| t.unwrap()).collect();
    let mut index: ahash::AHashMap<&[u8], u32> = ahash::AHashMap::with_capacity(vocab.len());
    for (i, t) in vocab.iter().enumerate() {
        index.insert(t.as_slice(), i as u32);
    }

    let mlist = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or("model.merges must be a list")?;
    let mut merges = Vec::with_capacity(mlist.len());
    for m in mlist {
        let (l, r): (String, String) = match m {
            Value::Array(a) if a.len() == 2 => (
                a[0].as_str().ok_or("merge entries must be strings")?.into(),
                a[1].as_str().ok_or("merge entries must be strings")?.into(),
            ),
            Value::String(s) => {
                let (l, r) = s
                    .split_once(' ')
                    .ok_or_else(|| format!("bad merge {s:?}"))?;
                (l.into(), r.into())
            }
            _ => return Err(format!("bad merge entry {m}")),
        };
        let li = *by_str
            .get(l.as_str())
            .ok_or_else(|| format!("merge token {l:?} not in vocab"))?;
        let ri = *by_str
            .get(r.as_str())
            .ok_or_else(|| format!("merge token {r:?} not in vocab"))?;
        let mut cat = vocab[li as usize].clone();
        cat.extend_from_slice(&vocab[ri as usize]);
        let ni = *index
            .get(cat.as_slice())
            .ok_or_else(|| format!("merge {l:?} + {r:?} has no token in vocab"))?;
        merges.push((li, ri, ni));
    }

    let mut added: Vec<(u64, String)> = Vec::new();
    if let Some(list) = v.get("added_tokens").and_then(Value::as_array) {
        for t in list {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .ok_or("added token without id")?;
            let content = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or("added token without content")?;
            added.push((id, content.to_string()));
        }
    }
    added.sort();
    for (i, (id, c)) in added.iter().enumerate() {
        if *id != (vocab.len() + i) as u64 {
            return Err(format!(
                "special token {c:?} has id {id}; expected {} (specials must follow the vocabulary)",
                vocab.len() + i
            ));
        }
    }
    let specials = added.into_iter().map(|(_, c)| c).collect();
    drop(index);
    Core::new(pattern, splitter, vocab, merges, specials)
}

/// tiktoken format: one "<base64 of token bytes> <rank>" line per non-special token.
pub fn to_tiktoken(core: &Core) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::with_capacity(core.vocab.len() * 16);
    for (id, t) in core.vocab.iter().enumerate() {
        out.push_str(&b64.encode(t));
        out.push(' ');
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_is_gpt2_mapping() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], char::from_u32(0x143).unwrap());
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }
}
