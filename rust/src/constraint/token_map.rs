//! [`TokenMap`]: the (level, code) -> token-id mapping, the format tags and the tokens free
//! reasoning may not use; shared by every request of a model.

use crate::error::{Gr2Error, Result};

pub(super) const NO_CODE: u32 = u32::MAX;

/// Most SID levels anything in gr2 decodes or verifies: code tokens are spelled `<s_X_N>` with
/// one level letter X in `a..z`.
pub const MAX_SID_LEVELS: usize = 26;

/// Largest `vocab_size` a [`TokenMap`] accepts (2^26, far above any tokenizer's): its id tables
/// are `vocab_size` long, so a wrong argument fails fast instead of allocating gigabytes.
pub const MAX_VOCAB_SIZE: usize = 1 << 26;

/// Token ids of the SID vocabulary and the output-format tags inside one tokenizer/model.
#[derive(Debug)]
pub struct TokenMap {
    pub levels: usize,
    pub level_sizes: Vec<usize>,
    /// `code_ids[level][code]` = token id.
    pub code_ids: Vec<Vec<u32>>,
    pub sid_begin: u32,
    pub sid_end: u32,
    pub think_open: u32,
    pub think_close: u32,
    pub answer_open: u32,
    pub answer_close: u32,
    pub eos: u32,
    /// Width of the logits (the model's vocabulary, possibly padded beyond the tokenizer).
    pub vocab_size: usize,
    /// token id -> `level << 16 | code`, or `NO_CODE`.
    pub(super) token_code: Vec<u32>,
    /// Bitmask row of free reasoning: ids `< reasoning_vocab` minus the forbidden ones.
    pub(super) reasoning_row: Vec<u32>,
    /// Sorted ids free reasoning may not use (format tags that would break the structure, EOS,
    /// caller-supplied ids such as padding, everything `>= reasoning_vocab`).
    pub(super) reasoning_forbidden: Vec<u32>,
}

/// Arguments of [`TokenMap::new`].
pub struct TokenMapSpec {
    pub code_ids: Vec<Vec<i64>>,
    pub sid_begin: i64,
    pub sid_end: i64,
    pub think_open: i64,
    pub think_close: i64,
    pub answer_open: i64,
    pub answer_close: i64,
    pub eos: i64,
    pub vocab_size: usize,
    /// Ids `>= reasoning_vocab` are never allowed in free text (padding rows of the embedding).
    pub reasoning_vocab: Option<usize>,
    pub forbidden_in_reasoning: Vec<i64>,
}

pub fn words_per_row(vocab_size: usize) -> usize {
    vocab_size.div_ceil(32)
}

impl TokenMap {
    pub fn new(spec: TokenMapSpec) -> Result<Self> {
        let v = spec.vocab_size;
        if v == 0 || v > MAX_VOCAB_SIZE {
            return Err(Gr2Error::invalid(format!("vocab_size must be in 1..={MAX_VOCAB_SIZE}, got {v}")));
        }
        let check = |name: &str, id: i64| -> Result<u32> {
            if id < 0 || id as usize >= v {
                return Err(Gr2Error::invalid(format!("{name} token id {id} outside 0..{}", v - 1)));
            }
            Ok(id as u32)
        };
        let tags = [
            ("sid_begin", spec.sid_begin),
            ("sid_end", spec.sid_end),
            ("think_open", spec.think_open),
            ("think_close", spec.think_close),
            ("answer_open", spec.answer_open),
            ("answer_close", spec.answer_close),
            ("eos", spec.eos),
        ];
        let mut tag_ids = Vec::with_capacity(tags.len());
        for (name, id) in tags {
            tag_ids.push(check(name, id)?);
        }
        for i in 0..tag_ids.len() {
            for j in 0..i {
                if tag_ids[i] == tag_ids[j] {
                    return Err(Gr2Error::invalid(format!(
                        "tags {} and {} share token id {}",
                        tags[j].0, tags[i].0, tag_ids[i]
                    )));
                }
            }
        }
        if spec.code_ids.is_empty() {
            return Err(Gr2Error::invalid("the SID vocabulary needs at least one level"));
        }
        if spec.code_ids.len() > MAX_SID_LEVELS {
            return Err(Gr2Error::invalid(format!(
                "code_ids has {} levels; at most {MAX_SID_LEVELS} SID levels are supported (the level letters a..z of <s_X_N>)",
                spec.code_ids.len()
            )));
        }
        let mut token_code = vec![NO_CODE; v];
        for &t in &tag_ids {
            token_code[t as usize] = NO_CODE - 1; // marks "a tag" while checking overlaps
        }
        let mut code_ids = Vec::with_capacity(spec.code_ids.len());
        let mut level_sizes = Vec::with_capacity(spec.code_ids.len());
        for (level, row) in spec.code_ids.iter().enumerate() {
            // A row may be padded with -1 beyond the level's size (gr2.tokens.SidTokens layout).
            let size = row.iter().take_while(|&&id| id >= 0).count();
            if size == 0 || size > 65536 || row[size..].iter().any(|&id| id >= 0) {
                return Err(Gr2Error::invalid(format!(
                    "code ids of level {level} must be >= 0 for codes 0..size-1 then -1 padding (size 1..65536)"
                )));
            }
            let mut ids = Vec::with_capacity(size);
            for (code, &id) in row[..size].iter().enumerate() {
                let t = check(&format!("code ({level}, {code})"), id)? as usize;
                if token_code[t] != NO_CODE {
                    return Err(Gr2Error::invalid(format!(
                        "token id {t} of code ({level}, {code}) is already used by another tag or code"
                    )));
                }
                token_code[t] = ((level as u32) << 16) | code as u32;
                ids.push(t as u32);
            }
            code_ids.push(ids);
            level_sizes.push(size);
        }
        for &t in &tag_ids {
            token_code[t as usize] = NO_CODE;
        }
        let reasoning_vocab = spec.reasoning_vocab.unwrap_or(v);
        if reasoning_vocab == 0 || reasoning_vocab > v {
            return Err(Gr2Error::invalid(format!("reasoning_vocab must be in 1..={v}, got {reasoning_vocab}")));
        }
        let [sid_begin, sid_end, think_open, think_close, answer_open, answer_close, eos] =
            <[u32; 7]>::try_from(tag_ids).expect("seven tags");
        let mut forbidden = vec![think_open, answer_open, answer_close, eos];
        for &id in &spec.forbidden_in_reasoning {
            let t = check("forbidden_in_reasoning", id)?;
            if t == think_close {
                return Err(Gr2Error::invalid("</think> cannot be forbidden in reasoning: it ends it"));
            }
            forbidden.push(t);
        }
        forbidden.extend(reasoning_vocab as u32..v as u32);
        forbidden.sort_unstable();
        forbidden.dedup();
        let words = words_per_row(v);
        let mut reasoning_row = vec![0u32; words];
        for t in 0..v {
            reasoning_row[t / 32] |= 1 << (t % 32);
        }
        for &t in &forbidden {
            reasoning_row[t as usize / 32] &= !(1 << (t % 32));
        }
        Ok(TokenMap {
            levels: code_ids.len(),
            level_sizes,
            code_ids,
            sid_begin,
            sid_end,
            think_open,
            think_close,
            answer_open,
            answer_close,
            eos,
            vocab_size: v,
            token_code,
            reasoning_row,
            reasoning_forbidden: forbidden,
        })
    }

    pub fn words(&self) -> usize {
        words_per_row(self.vocab_size)
    }

    pub fn reasoning_forbidden(&self) -> &[u32] {
        &self.reasoning_forbidden
    }

    /// (level, code) of a code token, None for any other token.
    pub(super) fn code_of(&self, token: u32) -> Option<(usize, u16)> {
        let packed = *self.token_code.get(token as usize)?;
        (packed != NO_CODE).then_some(((packed >> 16) as usize, (packed & 0xFFFF) as u16))
    }

    pub(super) fn token_name(&self, token: u32) -> String {
        let tags = [
            (self.sid_begin, "<|sid_begin|>"),
            (self.sid_end, "<|sid_end|>"),
            (self.think_open, "<think>"),
            (self.think_close, "</think>"),
            (self.answer_open, "<answer>"),
            (self.answer_close, "</answer>"),
            (self.eos, "EOS"),
        ];
        if let Some((_, name)) = tags.iter().find(|(id, _)| *id == token) {
            return format!("{token} ({name})");
        }
        match self.code_of(token) {
            Some((level, code)) => format!("{token} (level {level} code {code})"),
            None => format!("{token}"),
        }
    }
}
