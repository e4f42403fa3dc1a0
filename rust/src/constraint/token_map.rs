//! [`TokenMap`]: the (level, code) -> token-id mapping, the format tags and the tokens free
//! reasoning may not use; shared by every request of a model, and by the reward verifier's
//! token-id path (which reads only the tags and codes, [`TokenMap::role`]).

use crate::error::{Gr2Error, Result};

/// Most SID levels anything in gr2 decodes or verifies: code tokens are spelled `<s_X_N>` with
/// one level letter X in `a..z`.
pub const MAX_SID_LEVELS: usize = 26;

/// `Ok` when `levels` is in `1..=MAX_SID_LEVELS`; else an InvalidInputError saying that `what`
/// (the argument holding the SIDs) has too many or no levels.
pub(crate) fn check_sid_levels(what: &str, levels: usize) -> Result<()> {
    if levels == 0 || levels > MAX_SID_LEVELS {
        return Err(Gr2Error::invalid(format!(
            "{what}: {levels} SID levels, but gr2 supports 1..={MAX_SID_LEVELS} (code tokens <s_X_N> name the level with one letter a..z)"
        )));
    }
    Ok(())
}

/// Largest `vocab_size` a [`TokenMap`] accepts (2^26, far above any tokenizer's): its id tables
/// are `vocab_size` long, so a wrong argument fails fast instead of allocating gigabytes.
pub const MAX_VOCAB_SIZE: usize = 1 << 26;

/// What one token id is in the output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    /// The token of `code` at SID level `level`.
    Code { level: u8, code: u16 },
    SidBegin,
    SidEnd,
    ThinkOpen,
    ThinkClose,
    AnswerOpen,
    AnswerClose,
    Eos,
    /// No format token: text, or an id outside `0..vocab_size`.
    Other,
}

/// The tags in the order of [`TokenMap::new`]'s checks and of their slots in the role table.
const TAG_ROLES: [TokenRole; 7] = [
    TokenRole::SidBegin,
    TokenRole::SidEnd,
    TokenRole::ThinkOpen,
    TokenRole::ThinkClose,
    TokenRole::AnswerOpen,
    TokenRole::AnswerClose,
    TokenRole::Eos,
];

/// Role-table entries: a code is `level << 16 | code` (levels < 26 keep it below the tags), tag
/// `k` of [`TAG_ROLES`] is `ROLE_FIRST_TAG + k`, anything else `ROLE_OTHER`.
const ROLE_OTHER: u32 = u32::MAX;
const ROLE_FIRST_TAG: u32 = u32::MAX - 8;

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
    /// End of sequence; None for a map that only verifies completions (decoding needs it).
    pub eos: Option<u32>,
    /// Width of the logits (the model's vocabulary, possibly padded beyond the tokenizer).
    pub vocab_size: usize,
    /// token id -> its role, packed (see `ROLE_OTHER`).
    token_role: Vec<u32>,
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
    /// None: a map for reward verification only (no decoding).
    pub eos: Option<i64>,
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
        let mut tags = vec![
            ("sid_begin", spec.sid_begin),
            ("sid_end", spec.sid_end),
            ("think_open", spec.think_open),
            ("think_close", spec.think_close),
            ("answer_open", spec.answer_open),
            ("answer_close", spec.answer_close),
        ];
        tags.extend(spec.eos.map(|eos| ("eos", eos)));
        let mut tag_ids = Vec::with_capacity(tags.len());
        for &(name, id) in &tags {
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
        check_sid_levels("code_ids", spec.code_ids.len())?;
        let mut token_role = vec![ROLE_OTHER; v];
        for (k, &t) in tag_ids.iter().enumerate() {
            token_role[t as usize] = ROLE_FIRST_TAG + k as u32;
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
                if token_role[t] != ROLE_OTHER {
                    return Err(Gr2Error::invalid(format!(
                        "token id {t} of code ({level}, {code}) is already used by another tag or code"
                    )));
                }
                token_role[t] = ((level as u32) << 16) | code as u32;
                ids.push(t as u32);
            }
            code_ids.push(ids);
            level_sizes.push(size);
        }
        let reasoning_vocab = spec.reasoning_vocab.unwrap_or(v);
        if reasoning_vocab == 0 || reasoning_vocab > v {
            return Err(Gr2Error::invalid(format!("reasoning_vocab must be in 1..={v}, got {reasoning_vocab}")));
        }
        let (sid_begin, sid_end, think_open, think_close, answer_open, answer_close) =
            (tag_ids[0], tag_ids[1], tag_ids[2], tag_ids[3], tag_ids[4], tag_ids[5]);
        let eos = tag_ids.get(6).copied();
        let mut forbidden = vec![think_open, answer_open, answer_close];
        forbidden.extend(eos);
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
            token_role,
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

    /// The role of token id `token` (any i64: ids outside `0..vocab_size` are [`TokenRole::Other`]).
    #[inline]
    pub fn role(&self, token: i64) -> TokenRole {
        let Some(&packed) = usize::try_from(token).ok().and_then(|t| self.token_role.get(t)) else {
            return TokenRole::Other;
        };
        match packed {
            ROLE_OTHER => TokenRole::Other,
            tag if tag >= ROLE_FIRST_TAG => TAG_ROLES[(tag - ROLE_FIRST_TAG) as usize],
            code => TokenRole::Code { level: (code >> 16) as u8, code: (code & 0xFFFF) as u16 },
        }
    }

    /// (level, code) of a code token, None for any other token.
    pub(super) fn code_of(&self, token: u32) -> Option<(usize, u16)> {
        match self.role(i64::from(token)) {
            TokenRole::Code { level, code } => Some((level as usize, code)),
            _ => None,
        }
    }

    pub(super) fn token_name(&self, token: u32) -> String {
        let tag = match self.role(i64::from(token)) {
            TokenRole::Code { level, code } => return format!("{token} (level {level} code {code})"),
            TokenRole::Other => return format!("{token}"),
            TokenRole::SidBegin => "<|sid_begin|>",
            TokenRole::SidEnd => "<|sid_end|>",
            TokenRole::ThinkOpen => "<think>",
            TokenRole::ThinkClose => "</think>",
            TokenRole::AnswerOpen => "<answer>",
            TokenRole::AnswerClose => "</answer>",
            TokenRole::Eos => "EOS",
        };
        format!("{token} ({tag})")
    }
}
