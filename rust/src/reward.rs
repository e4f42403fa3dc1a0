//! Batched reward verification for rerank completions (docs/DESIGN.md §1, "Rewards").
//!
//! One call verifies a whole batch: parse each completion, check that its answer is a permutation
//! of the row's K candidates, and compute the verifiable rewards and per-row metrics. Rows are
//! independent and processed in parallel with rayon.
//!
//! # Accepted completion format (how strict we are)
//!
//! ```text
//! [ws] [<think> ANY </think> [ws]] <answer> ( [ws] SID )* [ws] </answer> ( ws | TRAILER )*
//! SID := <|sid_begin|> [ws] <s_a_N> [ws] <s_b_N> ... [ws] <|sid_end|>      (exactly L codes)
//! ```
//! * `ws` is ASCII space, tab, newline or carriage return (nothing else: a no-break space is text).
//! * The answer block is the **last** `<answer>` of the completion. Everything before it must be
//!   whitespace, or whitespace + `<think>` ANY `</think>` + whitespace. The think block is free
//!   text: ANY may hold anything, tag-like text included (`<answer>`, `</think>`, SIDs). This is
//!   the one rule both paths can apply identically: a text completion cannot tell a tag token from
//!   the same characters spelled by ordinary BPE pieces (demo tokenizer: `<answer>` = ids
//!   `[31, 1993, 33]`), so the token path treats the think body as free too, and a completion
//!   decoded by `gr2.constrained_decode` is valid on both paths (issue 14).
//! * Inside `<answer>` only SIDs and whitespace are allowed. Code tokens are `<s_X_N>` with level
//!   letter X matching the position in the SID (`a` first) and N a decimal number without leading
//!   zeros that fits u16; anything else (a tag inside a SID, `<s_b_..>` in first position, 007,
//!   99999999999, a SID with L-1 or L+1 codes) is malformed.
//! * After `</answer>`: whitespace and the configured trailer strings only (end-of-sequence texts
//!   such as `<|im_end|>`; none by default; a trailer may not contain `<answer>`), repeated any
//!   number of times. A missing `</answer>` (truncated output) or any other trailing text is
//!   malformed.
//!
//! Token-id completions follow the same grammar over token ids: the tag and code ids come from the
//! model's [`TokenMap`] (the one constrained decoding uses; its EOS plays no part here); ids listed
//! as whitespace are skipped where `ws` is allowed, trailer ids are accepted after `</answer>`,
//! and every other id is "text" (allowed only inside `<think>`).
//!
//! Rows may have different candidate counts (ragged K, [`Candidates::offsets`]).
//!
//! # Validation order
//! Malformed beats everything. Then the SIDs are checked in output order and the first problem
//! wins: a SID that is no candidate of the row (`NotCandidate` if a catalog is given and holds it,
//! else `UnknownSid`), then a repeated candidate (`Repeat`); finally a count other than K
//! (`WrongCount`, which with distinct candidates can only be "too few").

use rayon::prelude::*;

use crate::constraint::{check_sid_levels, TokenMap, TokenRole};
use crate::error::{Gr2Error, Result};
use crate::index::SidIndex;

/// Item id written into `ranking` for rows whose output is not a valid permutation.
pub const NO_ITEM: u64 = u64::MAX;

/// Why a completion is not a valid permutation of its candidates (`Ok` when it is).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    Ok = 0,
    Malformed = 1,
    WrongCount = 2,
    Repeat = 3,
    NotCandidate = 4,
    UnknownSid = 5,
}

impl InvalidReason {
    pub const NAMES: [&'static str; 6] = ["ok", "malformed", "wrong_count", "repeat", "not_candidate", "unknown_sid"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// Which reward goes into `reward` for valid rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardKind {
    /// R_rank (+ alpha * R_fmt, conditionally or not): the single-target reward of the paper.
    Rank,
    /// Graded NDCG@graded_k over the relevance array (technical-report variant).
    GradedNdcg,
    /// Per-list AUC over the relevance array (technical-report variant).
    Auc,
}

#[derive(Clone, Debug)]
pub struct RewardConfig {
    pub alpha: f64,
    /// Conditional format reward (the fix): alpha only when R_rank > 0 or both ranks are 1.
    pub conditional: bool,
    /// Reward of an output that is not a valid permutation.
    pub invalid_reward: f64,
    /// Cut-offs of the per-row Recall@k / NDCG@k metrics.
    pub metric_ks: Vec<usize>,
    /// Cut-off of the graded NDCG; 0 means K.
    pub graded_k: usize,
    pub kind: RewardKind,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            alpha: 0.2,
            conditional: true,
            invalid_reward: -1.0,
            metric_ks: vec![1, 3, 5],
            graded_k: 0,
            kind: RewardKind::Rank,
        }
    }
}

impl RewardConfig {
    fn validate(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(Gr2Error::invalid(format!("alpha must be finite, got {}", self.alpha)));
        }
        if !self.invalid_reward.is_finite() {
            return Err(Gr2Error::invalid(format!("invalid_reward must be finite, got {}", self.invalid_reward)));
        }
        if self.metric_ks.is_empty() || self.metric_ks.contains(&0) {
            return Err(Gr2Error::invalid(format!("metric_ks must be non-empty cut-offs >= 1, got {:?}", self.metric_ks)));
        }
        Ok(())
    }
}

/// One batch of rerank requests: B rows of K candidates with their L-level SIDs. Rectangular
/// (every row K = `k`) when `offsets` is None; ragged otherwise: row `b` holds the candidates
/// `offsets[b]..offsets[b + 1]` of the flat arrays, and `k` is the largest row (the width of
/// `RewardOutput::ranking`).
pub struct Candidates<'a> {
    pub rows: usize,
    pub k: usize,
    pub levels: usize,
    /// Candidate item ids in upstream order, (B, K) row-major, or (N,) with `offsets`.
    pub items: &'a [u64],
    /// Their SIDs, (B, K, L) row-major, or (N, L) with `offsets`.
    pub sids: &'a [u16],
    /// Target item per row, (B,).
    pub targets: &'a [u64],
    /// Optional graded relevance aligned with `items`, (B, K) or (N,), finite and >= 0.
    pub relevance: Option<&'a [f32]>,
    /// B + 1 row starts into the flat arrays (ragged K); None = rectangular.
    pub offsets: Option<&'a [usize]>,
}

impl Candidates<'_> {
    /// (first flat index, K) of `row`.
    #[inline]
    fn span(&self, row: usize) -> (usize, usize) {
        match self.offsets {
            Some(o) => (o[row], o[row + 1] - o[row]),
            None => (row * self.k, self.k),
        }
    }

    /// Number of candidates over all rows; None when B x K overflows (a wrong `k`).
    fn total(&self) -> Option<usize> {
        match self.offsets {
            Some(o) => Some(o.last().copied().unwrap_or(0)),
            None => self.rows.checked_mul(self.k),
        }
    }

    /// (row, column) of a flat candidate index.
    fn position(&self, flat: usize) -> (usize, usize) {
        match self.offsets {
            Some(o) => {
                let row = o.partition_point(|&start| start <= flat) - 1;
                (row, flat - o[row])
            }
            None => (flat / self.k.max(1), flat % self.k.max(1)),
        }
    }

    fn validate(&self) -> Result<()> {
        let (b, k, l) = (self.rows, self.k, self.levels);
        if let Some(o) = self.offsets {
            if o.len() != b + 1 || o[0] != 0 {
                return Err(Gr2Error::invalid(format!("candidate offsets must be B + 1 = {} row starts from 0", b + 1)));
            }
            if let Some(row) = o.windows(2).position(|w| w[1] <= w[0]) {
                return Err(Gr2Error::invalid(format!(
                    "request {row} has {} candidates; every request needs K >= 1",
                    o[row + 1].saturating_sub(o[row])
                )));
            }
            let widest = o.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            if widest != k {
                return Err(Gr2Error::invalid(format!("k = {k} must be the largest row ({widest})")));
            }
        } else if k == 0 {
            return Err(Gr2Error::invalid("candidates must have K >= 1 columns"));
        }
        check_sid_levels("candidate SIDs", l)?;
        let n = self.total().ok_or_else(|| Gr2Error::invalid(format!("{b} rows of k = {k} candidates overflow usize")))?;
        if self.items.len() != n {
            return Err(Gr2Error::invalid(format!("candidates hold {} ids, expected {n}", self.items.len())));
        }
        if self.sids.len() != n * l {
            return Err(Gr2Error::invalid(format!(
                "candidate SIDs hold {} codes, expected {n} candidates x {l} levels",
                self.sids.len()
            )));
        }
        if self.targets.len() != b {
            return Err(Gr2Error::invalid(format!("targets has {} entries, expected B = {b}", self.targets.len())));
        }
        if let Some(rel) = self.relevance {
            if rel.len() != n {
                return Err(Gr2Error::invalid(format!("relevance has {} entries, expected one per candidate ({n})", rel.len())));
            }
            if let Some(pos) = rel.iter().position(|r| !r.is_finite() || *r < 0.0) {
                let (row, col) = self.position(pos);
                return Err(Gr2Error::invalid(format!(
                    "relevance must be finite and >= 0; row {row} column {col} is {}",
                    rel[pos]
                )));
            }
        }
        // rows are independent: check them in parallel, report the first bad row
        match (0..b).into_par_iter().with_min_len(256).map(|row| self.validate_row(row)).find_first(|r| r.is_err()) {
            Some(err) => err,
            None => Ok(()),
        }
    }

    /// Distinct items, distinct SIDs and a target among the candidates, for one row.
    fn validate_row(&self, row: usize) -> Result<()> {
        let (start, k) = self.span(row);
        let items = &self.items[start..start + k];
        // SIDs of up to 4 levels compare as one u64 each (a slice `==` per pair would call
        // memcmp); K <= 64 keeps the keys on the stack
        let mut keys = [0u64; 64];
        let packed = self.levels <= 4 && k <= keys.len();
        if packed {
            for (c, key) in keys[..k].iter_mut().enumerate() {
                *key = pack_sid(self.sid(row, c));
            }
        }
        for i in 0..k {
            for j in 0..i {
                if items[i] == items[j] {
                    return Err(Gr2Error::invalid(format!(
                        "row {row}: candidate item {} appears twice (columns {j} and {i})",
                        items[i]
                    )));
                }
                let same = if packed { keys[i] == keys[j] } else { same_sid(self.sid(row, i), self.sid(row, j)) };
                if same {
                    return Err(Gr2Error::invalid(format!(
                        "row {row}: candidates {} and {} share the SID {:?}",
                        items[j],
                        items[i],
                        self.sid(row, i)
                    )));
                }
            }
        }
        if !items.contains(&self.targets[row]) {
            return Err(Gr2Error::UnknownItem(format!(
                "row {row}: target item {} is not among its {k} candidates; filter such rows out \
                 before computing rewards (the rank reward needs the target's pre-rank)",
                self.targets[row]
            )));
        }
        Ok(())
    }

    #[inline]
    fn sid(&self, row: usize, col: usize) -> &[u16] {
        let l = self.levels;
        let start = (self.span(row).0 + col) * l;
        &self.sids[start..start + l]
    }
}

/// The SIDs of the whole catalog; used to tell "a catalog item that is not a candidate" from "a
/// SID of no item". Either a loaded [`SidIndex`] (what the Python layer passes: no copy of its
/// codes per call) or a plain table of SIDs sorted ascending.
pub enum Catalog<'a> {
    Index(&'a SidIndex),
    Sorted { levels: usize, codes: &'a [u16] },
}

impl<'a> Catalog<'a> {
    /// A sorted, unique (rows, levels) table of SIDs (as `SidIndex::codes_by_sid` returns them).
    pub fn new(codes: &'a [u16], levels: usize) -> Result<Self> {
        if levels == 0 || codes.len() % levels != 0 {
            return Err(Gr2Error::invalid(format!("catalog codes ({} values) are not rows of {levels} levels", codes.len())));
        }
        let rows = codes.len() / levels;
        for i in 1..rows {
            if codes[(i - 1) * levels..i * levels] >= codes[i * levels..(i + 1) * levels] {
                return Err(Gr2Error::invalid(format!(
                    "catalog SIDs must be sorted ascending and unique (as SidIndex.codes() returns them); rows {} and {i} are not",
                    i - 1
                )));
            }
        }
        Ok(Catalog::Sorted { levels, codes })
    }

    pub fn levels(&self) -> usize {
        match self {
            Catalog::Index(index) => index.levels(),
            Catalog::Sorted { levels, .. } => *levels,
        }
    }

    pub fn contains(&self, sid: &[u16]) -> bool {
        let (l, codes) = match self {
            Catalog::Index(index) => return index.position_of_sid(sid).is_some(),
            Catalog::Sorted { levels, codes } => (*levels, *codes),
        };
        if sid.len() != l {
            return false;
        }
        let (mut lo, mut hi) = (0usize, codes.len() / l);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match codes[mid * l..(mid + 1) * l].cmp(sid) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

/// A structural symbol of the completion grammar (whitespace already skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sym {
    End,
    ThinkOpen,
    AnswerOpen,
    AnswerClose,
    SidBegin,
    SidEnd,
    Code(u8, u16),
    Trailer,
    /// Anything else (text, a malformed code token, a stray `</think>`).
    Other,
}

/// Where `open_answer` found the think block and the answer (in the lexer's units).
struct Frame {
    /// `<think>` through `</think>`, end exclusive; None when only whitespace precedes the answer.
    think: Option<(usize, usize)>,
    /// Start of the last `<answer>`.
    answer: usize,
}

trait Lexer: Clone {
    /// Units of `<|sid_begin|>` (13 bytes of text, 1 token id).
    const SID_BEGIN_LEN: usize;
    /// Position the lexer just after the **last** answer-open tag and check that everything
    /// before it is `ws* [<think> ANY </think> ws*]` (module docs). Err(()) = malformed.
    fn open_answer(&mut self) -> std::result::Result<Frame, ()>;
    /// Current position (bytes of a text, index of a token id).
    fn pos(&self) -> usize;
    /// Next symbol after skipping whitespace; trailers are recognised only when `after_answer`.
    fn next_sym(&mut self, after_answer: bool) -> Sym;

    /// Called right after `<|sid_begin|>`: exactly `levels` codes in level order, then
    /// `<|sid_end|>`, pushed onto `out`. Err(()) = malformed.
    fn sid_body(&mut self, levels: usize, out: &mut Vec<u16>) -> std::result::Result<(), ()> {
        sid_body_by_symbols(self, levels, out)
    }
}

fn sid_body_by_symbols<X: Lexer + ?Sized>(lx: &mut X, levels: usize, out: &mut Vec<u16>) -> std::result::Result<(), ()> {
    for level in 0..levels {
        match lx.next_sym(false) {
            Sym::Code(l, code) if l as usize == level => out.push(code),
            _ => return Err(()),
        }
    }
    if lx.next_sym(false) == Sym::SidEnd {
        Ok(())
    } else {
        Err(())
    }
}

/// Parse one completion into `out` (flat L codes per SID). Err(()) = malformed.
fn parse<X: Lexer>(lx: &mut X, levels: usize, out: &mut Vec<u16>) -> std::result::Result<(), ()> {
    lx.open_answer()?;
    answer_body(lx, levels, out, None)?;
    answer_tail(lx)
}

/// After `<answer>`: SIDs up to and including `</answer>`; each SID's span (`<|sid_begin|>`
/// through `<|sid_end|>`, end exclusive) is pushed onto `spans` when given.
fn answer_body<X: Lexer>(
    lx: &mut X,
    levels: usize,
    out: &mut Vec<u16>,
    mut spans: Option<&mut Vec<(usize, usize)>>,
) -> std::result::Result<(), ()> {
    loop {
        match lx.next_sym(false) {
            Sym::AnswerClose => return Ok(()),
            Sym::SidBegin => {
                let start = lx.pos() - X::SID_BEGIN_LEN;
                lx.sid_body(levels, out)?;
                if let Some(spans) = spans.as_deref_mut() {
                    spans.push((start, lx.pos()));
                }
            }
            _ => return Err(()),
        }
    }
}

/// Codes in the first SID after `<answer>` (1 when the answer holds no SID, where any count
/// parses alike): the level count of a completion parsed without one given.
fn first_sid_levels<X: Lexer>(lx: &X) -> usize {
    let mut probe = lx.clone();
    let mut n = 0;
    if probe.next_sym(false) == Sym::SidBegin {
        while let Sym::Code(level, _) = probe.next_sym(false) {
            if level as usize != n {
                break;
            }
            n += 1;
        }
    }
    n.max(1)
}

/// Where the parts of one completion the verifier accepts lie, in the lexer's units: byte
/// offsets of a text, indices of a token-id sequence; every span's end is exclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletionParts {
    /// `<think>` through `</think>`; None without a think block.
    pub think: Option<(usize, usize)>,
    /// The last `<answer>` through its `</answer>`.
    pub answer: (usize, usize),
    /// Each SID of the answer, `<|sid_begin|>` through `<|sid_end|>`.
    pub sids: Vec<(usize, usize)>,
    /// Codes per SID.
    pub levels: usize,
    /// The answer's SIDs, `levels` codes each.
    pub codes: Vec<u16>,
}

/// The verifier's parse of one completion with its spans; None = malformed (exactly when
/// [`verify`] would say `Malformed` with the same level count). `levels` None takes the count of
/// the answer's first SID.
fn parse_parts<X: Lexer>(lx: &mut X, levels: Option<usize>) -> Option<CompletionParts> {
    let frame = lx.open_answer().ok()?;
    let levels = levels.unwrap_or_else(|| first_sid_levels(lx));
    let (mut codes, mut sids) = (Vec::new(), Vec::new());
    answer_body(lx, levels, &mut codes, Some(&mut sids)).ok()?;
    let answer = (frame.answer, lx.pos());
    answer_tail(lx).ok()?;
    Some(CompletionParts { think: frame.think, answer, sids, levels, codes })
}

/// Parse every completion of `completions` with its spans ([`CompletionParts`]; None for a
/// malformed one). The grammar is the one [`verify`] applies; the level count is `levels`, or the
/// token map's for token ids, or else each answer's first SID's.
pub fn parse_completions<S: AsRef<str> + Sync>(
    completions: &Completions<'_, S>,
    levels: Option<usize>,
) -> Result<Vec<Option<CompletionParts>>> {
    completions.validate()?;
    if let Some(l) = levels {
        check_sid_levels("levels", l)?;
    }
    Ok((0..completions.len())
        .map(|row| match completions {
            Completions::Text { texts, trailers } => {
                parse_parts(&mut TextLexer { s: texts[row].as_ref().as_bytes(), pos: 0, trailers }, levels)
            }
            Completions::Tokens { ids, offsets, map, whitespace, trailers } => {
                let ids = &ids[offsets[row]..offsets[row + 1]];
                parse_parts(&mut TokenLexer { ids, pos: 0, map, whitespace, trailers }, Some(levels.unwrap_or(map.levels)))
            }
        })
        .collect())
}

/// After `</answer>`: whitespace and trailers to the end.
fn answer_tail<X: Lexer>(lx: &mut X) -> std::result::Result<(), ()> {
    loop {
        match lx.next_sym(true) {
            Sym::End => return Ok(()),
            Sym::Trailer => continue,
            _ => return Err(()),
        }
    }
}

#[derive(Clone)]
struct TextLexer<'a> {
    s: &'a [u8],
    pos: usize,
    trailers: &'a [String],
}

/// `s[pos..]` starts with `lit`. A byte loop: the literals are short and a libc memcmp call per
/// tag check cost more than the comparison itself.
#[inline(always)]
fn has_at(s: &[u8], pos: usize, lit: &[u8]) -> bool {
    s.len() >= pos + lit.len() && s[pos..pos + lit.len()].iter().zip(lit).all(|(a, b)| a == b)
}

/// `s[pos..]` starts with the fixed-size literal `lit`. Compared as (possibly overlapping) 8-, 4-
/// or 2-byte words: every tag literal is 3..=16 bytes, and the slice/array `==` would call
/// memcmp, which the profiler showed as the lexer's largest single cost.
#[inline(always)]
fn has_lit<const N: usize>(s: &[u8], pos: usize, lit: &[u8; N]) -> bool {
    let Some(w) = s.get(pos..pos + N) else { return false };
    #[inline(always)]
    fn word<const W: usize>(b: &[u8], at: usize) -> [u8; W] {
        b[at..at + W].try_into().unwrap()
    }
    match N {
        8..=16 => word::<8>(w, 0) == word::<8>(lit, 0) && word::<8>(w, N - 8) == word::<8>(lit, N - 8),
        4..=7 => word::<4>(w, 0) == word::<4>(lit, 0) && word::<4>(w, N - 4) == word::<4>(lit, N - 4),
        2..=3 => word::<2>(w, 0) == word::<2>(lit, 0) && w[N - 1] == lit[N - 1],
        _ => w == lit,
    }
}

#[inline(always)]
fn same_sid(a: &[u16], b: &[u16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl TextLexer<'_> {
    #[inline(always)]
    fn eat_lit<const N: usize>(&mut self, lit: &[u8; N]) -> bool {
        if has_lit(self.s, self.pos, lit) {
            self.pos += N;
            true
        } else {
            false
        }
    }

    #[inline]
    fn eat(&mut self, lit: &[u8]) -> bool {
        if has_at(self.s, self.pos, lit) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    /// At `<s_`: parse `<s_X_N>`; on failure return Other (the completion is malformed anyway).
    #[inline]
    fn code_token(&mut self) -> Sym {
        let s = &self.s[self.pos..];
        // s starts with "<s_"
        if s.len() < 7 || !s[3].is_ascii_lowercase() || s[4] != b'_' {
            return Sym::Other;
        }
        let level = s[3] - b'a';
        // up to 5 digits, no leading zero, then '>'
        let mut value = 0u32;
        let mut i = 5;
        while i < s.len() && i < 11 && s[i].is_ascii_digit() {
            value = value * 10 + (s[i] - b'0') as u32;
            i += 1;
        }
        let digits = i - 5;
        if digits == 0 || digits > 5 || (digits > 1 && s[5] == b'0') || i >= s.len() || s[i] != b'>' || value > u16::MAX as u32 {
            return Sym::Other;
        }
        self.pos += i + 1;
        Sym::Code(level, value as u16)
    }
}

impl Lexer for TextLexer<'_> {
    const SID_BEGIN_LEN: usize = b"<|sid_begin|>".len();

    fn pos(&self) -> usize {
        self.pos
    }

    /// The SID spans are most of an answer's bytes, so they get a tight loop; any whitespace or
    /// deviation from the plain spelling hands over to the general symbol-by-symbol path.
    fn sid_body(&mut self, levels: usize, out: &mut Vec<u16>) -> std::result::Result<(), ()> {
        let start = (self.pos, out.len());
        let fast = (|| {
            for level in 0..levels {
                let s = self.s.get(self.pos..)?;
                if !has_lit(s, 0, b"<s_") || s.get(3) != Some(&(b'a' + level as u8)) {
                    return None;
                }
                match self.code_token() {
                    Sym::Code(_, code) => out.push(code),
                    _ => return None,
                }
            }
            self.eat_lit(b"<|sid_end|>").then_some(())
        })();
        if fast.is_some() {
            return Ok(());
        }
        (self.pos, _) = start;
        out.truncate(start.1);
        sid_body_by_symbols(self, levels, out)
    }

    fn open_answer(&mut self) -> std::result::Result<Frame, ()> {
        let s = self.s;
        let at = memchr::memmem::rfind(s, b"<answer>").ok_or(())?;
        let mut lo = 0;
        while lo < at && is_ws(s[lo]) {
            lo += 1;
        }
        let mut hi = at;
        while hi > lo && is_ws(s[hi - 1]) {
            hi -= 1;
        }
        // `<think>` (7 bytes) then `</think>` (8 bytes), not overlapping
        if lo != hi && !(hi - lo >= 15 && has_lit(s, lo, b"<think>") && has_lit(s, hi - 8, b"</think>")) {
            return Err(());
        }
        self.pos = at + 8;
        Ok(Frame { think: (lo != hi).then_some((lo, hi)), answer: at })
    }

    fn next_sym(&mut self, after_answer: bool) -> Sym {
        while self.pos < self.s.len() && is_ws(self.s[self.pos]) {
            self.pos += 1;
        }
        if self.pos >= self.s.len() {
            return Sym::End;
        }
        if after_answer {
            for t in self.trailers {
                if self.eat(t.as_bytes()) {
                    return Sym::Trailer;
                }
            }
        }
        if self.s[self.pos] != b'<' {
            return Sym::Other;
        }
        match self.s.get(self.pos + 1) {
            Some(b's') if has_lit(self.s, self.pos, b"<s_") => self.code_token(),
            Some(b'|') if self.eat_lit(b"<|sid_begin|>") => Sym::SidBegin,
            Some(b'|') if self.eat_lit(b"<|sid_end|>") => Sym::SidEnd,
            Some(b'a') if self.eat_lit(b"<answer>") => Sym::AnswerOpen,
            Some(b'/') if self.eat_lit(b"</answer>") => Sym::AnswerClose,
            Some(b't') if self.eat_lit(b"<think>") => Sym::ThinkOpen,
            _ => Sym::Other,
        }
    }
}

/// What the token path reads an id as: a tag or code of the [`TokenMap`], else whitespace or a
/// trailer if the call lists it so, else text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenClass {
    Format(TokenRole),
    Whitespace,
    Trailer,
    Text,
}

#[derive(Clone)]
struct TokenLexer<'a> {
    ids: &'a [i64],
    pos: usize,
    map: &'a TokenMap,
    whitespace: &'a [i64],
    trailers: &'a [i64],
}

impl TokenLexer<'_> {
    #[inline]
    fn class(&self, id: i64) -> TokenClass {
        match self.map.role(id) {
            // EOS is no format tag of a completion: a trailer if listed as one, like any id
            TokenRole::Other | TokenRole::Eos => {
                if id < 0 {
                    TokenClass::Text
                } else if self.whitespace.contains(&id) {
                    TokenClass::Whitespace
                } else if self.trailers.contains(&id) {
                    TokenClass::Trailer
                } else {
                    TokenClass::Text
                }
            }
            role => TokenClass::Format(role),
        }
    }
}

impl Lexer for TokenLexer<'_> {
    const SID_BEGIN_LEN: usize = 1;

    fn pos(&self) -> usize {
        self.pos
    }

    fn open_answer(&mut self) -> std::result::Result<Frame, ()> {
        let class = |i: usize| self.class(self.ids[i]);
        let answer_open = TokenClass::Format(TokenRole::AnswerOpen);
        let at = (0..self.ids.len()).rev().find(|&i| class(i) == answer_open).ok_or(())?;
        let mut lo = 0;
        while lo < at && class(lo) == TokenClass::Whitespace {
            lo += 1;
        }
        let mut hi = at;
        while hi > lo && class(hi - 1) == TokenClass::Whitespace {
            hi -= 1;
        }
        let framed = hi - lo >= 2
            && class(lo) == TokenClass::Format(TokenRole::ThinkOpen)
            && class(hi - 1) == TokenClass::Format(TokenRole::ThinkClose);
        if lo != hi && !framed {
            return Err(());
        }
        self.pos = at + 1;
        Ok(Frame { think: (lo != hi).then_some((lo, hi)), answer: at })
    }

    fn next_sym(&mut self, after_answer: bool) -> Sym {
        loop {
            let Some(&id) = self.ids.get(self.pos) else { return Sym::End };
            self.pos += 1;
            return match self.class(id) {
                TokenClass::Whitespace => continue,
                TokenClass::Format(TokenRole::Code { level, code }) => Sym::Code(level, code),
                TokenClass::Format(TokenRole::ThinkOpen) => Sym::ThinkOpen,
                TokenClass::Format(TokenRole::AnswerOpen) => Sym::AnswerOpen,
                TokenClass::Format(TokenRole::AnswerClose) => Sym::AnswerClose,
                TokenClass::Format(TokenRole::SidBegin) => Sym::SidBegin,
                TokenClass::Format(TokenRole::SidEnd) => Sym::SidEnd,
                TokenClass::Trailer if after_answer => Sym::Trailer,
                _ => Sym::Other,
            };
        }
    }
}

/// The completions of one batch, as text or as token ids.
pub enum Completions<'a, S: AsRef<str> + Sync> {
    Text { texts: &'a [S], trailers: &'a [String] },
    /// Flat token ids with B+1 offsets: row b is ids[offsets[b]..offsets[b+1]]; the tags and
    /// codes come from `map`; `whitespace` and `trailers` are the ids read as whitespace and as
    /// end-of-sequence trailers (-1 entries are ignored).
    Tokens { ids: &'a [i64], offsets: &'a [usize], map: &'a TokenMap, whitespace: &'a [i64], trailers: &'a [i64] },
}

impl<S: AsRef<str> + Sync> Completions<'_, S> {
    fn len(&self) -> usize {
        match self {
            Completions::Text { texts, .. } => texts.len(),
            Completions::Tokens { offsets, .. } => offsets.len().saturating_sub(1),
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Completions::Text { trailers, .. } => {
                if trailers.iter().any(|t| t.is_empty()) {
                    return Err(Gr2Error::invalid("trailers: trailer strings must be non-empty"));
                }
                if let Some(t) = trailers.iter().find(|t| t.contains("<answer>")) {
                    return Err(Gr2Error::invalid(format!("trailers: {t:?} contains <answer>, which opens the answer block")));
                }
            }
            Completions::Tokens { ids, offsets, map, whitespace, trailers } => {
                if offsets.is_empty() || offsets[0] != 0 || *offsets.last().unwrap() != ids.len() {
                    return Err(Gr2Error::invalid("token offsets must start at 0 and end at the number of ids"));
                }
                if offsets.windows(2).any(|w| w[0] > w[1]) {
                    return Err(Gr2Error::invalid("token offsets must be non-decreasing"));
                }
                check_extra_token_ids(map, whitespace, trailers)?;
            }
        }
        Ok(())
    }

    fn parse_row(&self, row: usize, levels: usize, out: &mut Vec<u16>) -> std::result::Result<(), ()> {
        match self {
            Completions::Text { texts, trailers } => {
                let mut lx = TextLexer { s: texts[row].as_ref().as_bytes(), pos: 0, trailers };
                parse(&mut lx, levels, out)
            }
            Completions::Tokens { ids, offsets, map, whitespace, trailers } => {
                let mut lx = TokenLexer { ids: &ids[offsets[row]..offsets[row + 1]], pos: 0, map, whitespace, trailers };
                parse(&mut lx, levels, out)
            }
        }
    }
}

/// The whitespace and trailer ids of a token-id batch: each -1 (ignored) or >= 0, none a tag or
/// code of `map`, and no id both whitespace and a trailer.
fn check_extra_token_ids(map: &TokenMap, whitespace: &[i64], trailers: &[i64]) -> Result<()> {
    let listed = whitespace.iter().map(|&id| (id, "whitespace")).chain(trailers.iter().map(|&id| (id, "a trailer")));
    for (id, what) in listed.filter(|&(id, _)| id != -1) {
        if id < 0 {
            return Err(Gr2Error::invalid(format!("token id {id} ({what}) must be >= 0")));
        }
        let other_role = match map.role(id) {
            TokenRole::Other | TokenRole::Eos => what == "whitespace" && trailers.contains(&id),
            _ => true,
        };
        if other_role {
            return Err(Gr2Error::invalid(format!("token id {id} ({what}) is also used for another role")));
        }
    }
    Ok(())
}

/// Per-row results, one Vec per field (struct of arrays, as numpy wants them).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RewardOutput {
    pub reward: Vec<f64>,
    pub valid: Vec<bool>,
    pub invalid_reason: Vec<u8>,
    /// 1-based position of the target in the upstream order.
    pub rank_pre: Vec<u32>,
    /// 1-based position of the target in the output; 0 for invalid rows.
    pub rank_re: Vec<u32>,
    pub r_rank: Vec<f64>,
    pub r_fmt: Vec<f64>,
    pub copied_order: Vec<bool>,
    /// 1-based upstream position of the item the output ranks first; 0 for invalid rows.
    pub top1_input_pos: Vec<u32>,
    /// Number of SIDs parsed from the answer (0 for malformed rows).
    pub n_sids: Vec<u32>,
    /// Output order as item ids, (B, K); NO_ITEM in every slot of invalid rows.
    pub ranking: Vec<u64>,
    /// Recall@k and NDCG@k (single target) per row, (B, len(metric_ks)); 0 for invalid rows.
    pub recall: Vec<f64>,
    pub ndcg: Vec<f64>,
    /// Graded NDCG@graded_k and AUC (only with relevance; empty otherwise); 0 for invalid rows
    /// and for rows that copy a non-optimal input order.
    pub graded_ndcg: Vec<f64>,
    pub auc: Vec<f64>,
}

#[derive(Clone, Copy, Default)]
struct RowResult {
    reward: f64,
    reason: u8,
    rank_pre: u32,
    rank_re: u32,
    r_rank: f64,
    r_fmt: f64,
    copied: bool,
    top1: u32,
    n_sids: u32,
    graded_ndcg: f64,
    auc: f64,
}

/// Graded NDCG@cut of `order` (candidate columns) under `rel` (linear gain rel / log2(pos + 1)).
fn graded_ndcg(order: &[u32], rel: &[f32], cut: usize, sorted_scratch: &mut Vec<f64>) -> f64 {
    let dcg: f64 = order.iter().take(cut).enumerate().map(|(i, &c)| rel[c as usize] as f64 / ((i + 2) as f64).log2()).sum();
    sorted_scratch.clear();
    sorted_scratch.extend(rel.iter().map(|&r| r as f64));
    sorted_scratch.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let idcg: f64 = sorted_scratch.iter().take(cut).enumerate().map(|(i, &r)| r / ((i + 2) as f64).log2()).sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

/// Share of pairs (i, j) with rel_i > rel_j that `order` puts i before j; 0 when no such pair.
fn pair_auc(order: &[u32], rel: &[f32]) -> f64 {
    let (mut good, mut pairs) = (0u64, 0u64);
    for (a, &ca) in order.iter().enumerate() {
        for &cb in &order[a + 1..] {
            let (ra, rb) = (rel[ca as usize], rel[cb as usize]);
            if ra != rb {
                pairs += 1;
                good += (ra > rb) as u64;
            }
        }
    }
    if pairs == 0 {
        0.0
    } else {
        good as f64 / pairs as f64
    }
}

#[inline(always)]
fn pack_sid(sid: &[u16]) -> u64 {
    sid.iter().fold(0u64, |acc, &c| (acc << 16) | c as u64)
}

struct Scratch {
    keys: Vec<u64>,
    codes: Vec<u16>,
    order: Vec<u32>,
    seen: Vec<bool>,
    floats: Vec<f64>,
}

/// Verify a batch of completions and compute rewards and metrics (see the module docs).
pub fn verify<S: AsRef<str> + Sync>(
    completions: &Completions<'_, S>,
    cands: &Candidates<'_>,
    catalog: Option<&Catalog<'_>>,
    cfg: &RewardConfig,
) -> Result<RewardOutput> {
    cfg.validate()?;
    cands.validate()?;
    completions.validate()?;
    let (b, k, levels) = (cands.rows, cands.k, cands.levels);
    if completions.len() != b {
        return Err(Gr2Error::invalid(format!("{} completions for {b} candidate rows", completions.len())));
    }
    if let Completions::Tokens { map, .. } = completions {
        if map.levels != levels {
            return Err(Gr2Error::invalid(format!(
                "the token map has {} SID levels, the candidate SIDs {levels}",
                map.levels
            )));
        }
    }
    if let Some(cat) = catalog {
        if cat.levels() != levels {
            return Err(Gr2Error::invalid(format!("catalog SIDs have {} levels, candidate SIDs {levels}", cat.levels())));
        }
    }
    if cfg.kind != RewardKind::Rank && cands.relevance.is_none() {
        return Err(Gr2Error::invalid("graded rewards (ndcg, auc) need a relevance array"));
    }
    let nk = cfg.metric_ks.len();
    // 0 = each row's own K
    let graded_k = cfg.graded_k;

    let mut rows = vec![RowResult::default(); b];
    let mut ranking = vec![NO_ITEM; b * k];
    let mut recall = vec![0.0f64; b * nk];
    let mut ndcg = vec![0.0f64; b * nk];
    let new_scratch = || Scratch { keys: Vec::with_capacity(k), codes: Vec::new(), order: Vec::with_capacity(k), seen: vec![false; k], floats: Vec::new() };

    rows.par_iter_mut()
        .zip(ranking.par_chunks_mut(k.max(1)))
        .zip(recall.par_chunks_mut(nk))
        .zip(ndcg.par_chunks_mut(nk))
        .enumerate()
        .with_min_len(64)
        .for_each_init(new_scratch, |scratch, (row, (((res, rank_out), recall_out), ndcg_out))| {
            verify_row(completions, cands, catalog, cfg, graded_k, row, scratch, res, rank_out, recall_out, ndcg_out);
        });

    let mut out = RewardOutput {
        ranking,
        recall,
        ndcg,
        ..Default::default()
    };
    out.reward = rows.iter().map(|r| r.reward).collect();
    out.valid = rows.iter().map(|r| r.reason == 0).collect();
    out.invalid_reason = rows.iter().map(|r| r.reason).collect();
    out.rank_pre = rows.iter().map(|r| r.rank_pre).collect();
    out.rank_re = rows.iter().map(|r| r.rank_re).collect();
    out.r_rank = rows.iter().map(|r| r.r_rank).collect();
    out.r_fmt = rows.iter().map(|r| r.r_fmt).collect();
    out.copied_order = rows.iter().map(|r| r.copied).collect();
    out.top1_input_pos = rows.iter().map(|r| r.top1).collect();
    out.n_sids = rows.iter().map(|r| r.n_sids).collect();
    if cands.relevance.is_some() {
        out.graded_ndcg = rows.iter().map(|r| r.graded_ndcg).collect();
        out.auc = rows.iter().map(|r| r.auc).collect();
    }
    Ok(out)
}

/// Map the parsed SIDs onto candidate columns; the first problem in output order wins.
fn validate_sids(cands: &Candidates<'_>, catalog: Option<&Catalog<'_>>, row: usize, scratch: &mut Scratch) -> InvalidReason {
    let (k, levels) = (cands.span(row).1, cands.levels);
    scratch.order.clear();
    scratch.seen.clear();
    scratch.seen.resize(k, false);
    // SIDs of up to 4 levels compare as one u64 (the common case); longer ones code by code
    let packed = levels <= 4;
    if packed {
        scratch.keys.clear();
        scratch.keys.extend((0..k).map(|c| pack_sid(cands.sid(row, c))));
    }
    for sid in scratch.codes.chunks_exact(levels) {
        let found = if packed {
            let key = pack_sid(sid);
            scratch.keys.iter().position(|&c| c == key)
        } else {
            (0..k).find(|&c| same_sid(cands.sid(row, c), sid))
        };
        let Some(col) = found else {
            return match catalog {
                Some(cat) if cat.contains(sid) => InvalidReason::NotCandidate,
                _ => InvalidReason::UnknownSid,
            };
        };
        if scratch.seen[col] {
            return InvalidReason::Repeat;
        }
        scratch.seen[col] = true;
        scratch.order.push(col as u32);
    }
    if scratch.order.len() != k {
        return InvalidReason::WrongCount;
    }
    InvalidReason::Ok
}

#[allow(clippy::too_many_arguments)]
fn verify_row<S: AsRef<str> + Sync>(
    completions: &Completions<'_, S>,
    cands: &Candidates<'_>,
    catalog: Option<&Catalog<'_>>,
    cfg: &RewardConfig,
    graded_k: usize,
    row: usize,
    scratch: &mut Scratch,
    res: &mut RowResult,
    rank_out: &mut [u64],
    recall_out: &mut [f64],
    ndcg_out: &mut [f64],
) {
    let ((start, k), levels) = (cands.span(row), cands.levels);
    let items = &cands.items[start..start + k];
    let target_col = items.iter().position(|&it| it == cands.targets[row]).expect("validated: target is a candidate");
    res.rank_pre = target_col as u32 + 1;

    scratch.codes.clear();
    let reason = match completions.parse_row(row, levels, &mut scratch.codes) {
        Err(()) => InvalidReason::Malformed,
        Ok(()) => {
            res.n_sids = (scratch.codes.len() / levels) as u32;
            validate_sids(cands, catalog, row, scratch)
        }
    };
    res.reason = reason as u8;
    if reason != InvalidReason::Ok {
        res.reward = cfg.invalid_reward;
        return;
    }

    let order = &scratch.order;
    for (slot, &col) in rank_out.iter_mut().zip(order) {
        *slot = items[col as usize];
    }
    let rank_re = order.iter().position(|&c| c as usize == target_col).unwrap() + 1;
    res.rank_re = rank_re as u32;
    res.top1 = order[0] + 1;
    res.copied = order.iter().enumerate().all(|(i, &c)| c as usize == i);
    res.r_fmt = 1.0;
    res.r_rank = (res.rank_pre as f64 - rank_re as f64) / k as f64;
    let earns_format = !cfg.conditional || res.r_rank > 0.0 || (res.rank_pre == 1 && rank_re == 1);
    let rank_reward = if earns_format { res.r_rank + cfg.alpha * res.r_fmt } else { res.r_rank };

    for (i, &cut) in cfg.metric_ks.iter().enumerate() {
        if rank_re <= cut {
            recall_out[i] = 1.0;
            ndcg_out[i] = 1.0 / ((rank_re + 1) as f64).log2();
        }
    }

    if let Some(rel_all) = cands.relevance {
        let rel = &rel_all[start..start + k];
        let input_optimal = rel.windows(2).all(|w| w[0] >= w[1]);
        if !(res.copied && !input_optimal) {
            let cut = if graded_k == 0 { k } else { graded_k };
            res.graded_ndcg = graded_ndcg(order, rel, cut, &mut scratch.floats);
            res.auc = pair_auc(order, rel);
        }
    }
    res.reward = match cfg.kind {
        RewardKind::Rank => rank_reward,
        RewardKind::GradedNdcg => res.graded_ndcg,
        RewardKind::Auc => res.auc,
    };
}

#[cfg(test)]
mod tests;
