//! Constrained decoding for the rerank output format.
//!
//! Three pieces, all plain data (no Python types):
//! - [`TokenMap`]: the (level, code) -> token-id mapping, the format tags and the set of tokens
//!   that free reasoning may not use; shared by every request of a model.
//! - [`SidTrie`]: a compact prefix tree over a set of SIDs (the K candidates of one request, or a
//!   whole catalog). Children of a node are contiguous, so a step lists the allowed codes of one
//!   node without touching anything else.
//! - [`DecodeState`]: the per-request automaton
//!   `[<think> free text </think>] [<answer>] (<|sid_begin|> c_0 .. c_{L-1} <|sid_end|>){N}
//!   [</answer>] EOS`, where each SID is restricted to the items not yet emitted. A prefix shared by
//!   several remaining items stays open until resolved; a subtree whose items are all used is closed.
//!
//! [`fill_bitmask`] and [`allowed_lists`] fill many rows per call (rayon across rows) in the int32
//! bitmask layout of xgrammar / vLLM: `ceil(V/32)` words per row, bit `j` of word `i` allows token
//! `32*i + j`. A state with no allowed token is an error, never an unconstrained row.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Gr2Error, Result};

const NO_CODE: u32 = u32::MAX;

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
    token_code: Vec<u32>,
    /// Bitmask row of free reasoning: ids `< reasoning_vocab` minus the forbidden ones.
    reasoning_row: Vec<u32>,
    /// Sorted ids free reasoning may not use (format tags that would break the structure, EOS,
    /// caller-supplied ids such as padding, everything `>= reasoning_vocab`).
    reasoning_forbidden: Vec<u32>,
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
        if v == 0 || v > u32::MAX as usize / 2 {
            return Err(Gr2Error::invalid(format!("vocab_size must be in 1..2^31, got {v}")));
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
        if spec.code_ids.len() > 255 {
            return Err(Gr2Error::invalid("at most 255 SID levels"));
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
    fn code_of(&self, token: u32) -> Option<(usize, u16)> {
        let packed = *self.token_code.get(token as usize)?;
        (packed != NO_CODE).then_some(((packed >> 16) as usize, (packed & 0xFFFF) as u16))
    }

    fn token_name(&self, token: u32) -> String {
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

/// A prefix tree over unique SIDs. Node 0 is the root (depth 0); a node at depth `L` is a leaf and
/// stands for one item.
#[derive(Debug)]
pub struct SidTrie {
    levels: usize,
    /// Children of node `n` are `first_child[n]..first_child[n + 1]` in `child_code`/`child_node`.
    first_child: Vec<u32>,
    child_code: Vec<u16>,
    child_node: Vec<u32>,
    parent: Vec<u32>,
    /// Items under each node.
    leaf_count: Vec<u32>,
    /// Item id of each leaf node (0 for inner nodes).
    leaf_item: Vec<u64>,
    /// item id -> leaf node.
    item_leaf: HashMap<u64, u32>,
}

impl SidTrie {
    /// Build from `items` (n,) and their SIDs `codes` (n x levels, row-major).
    pub fn build(items: &[u64], codes: &[u16], levels: usize) -> Result<Self> {
        let n = items.len();
        if levels == 0 || levels > 255 {
            return Err(Gr2Error::invalid(format!("levels must be in 1..=255, got {levels}")));
        }
        if codes.len() != n * levels {
            return Err(Gr2Error::invalid(format!(
                "codes hold {} values, expected {n} items x {levels} levels",
                codes.len()
            )));
        }
        if n == 0 {
            return Err(Gr2Error::invalid("cannot build a SID trie over zero items"));
        }
        if n >= u32::MAX as usize / 2 {
            return Err(Gr2Error::invalid("too many items for one trie"));
        }
        let sid = |i: usize| &codes[i * levels..(i + 1) * levels];
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by(|&a, &b| sid(a as usize).cmp(sid(b as usize)));
        let mut item_leaf = HashMap::with_capacity(n);
        for &i in &order {
            if item_leaf.insert(items[i as usize], 0).is_some() {
                return Err(Gr2Error::invalid(format!("item {} appears twice", items[i as usize])));
            }
        }
        for w in order.windows(2) {
            if sid(w[0] as usize) == sid(w[1] as usize) {
                return Err(Gr2Error::invalid(format!(
                    "items {} and {} share the SID {:?}; SIDs must be unique (build them with gr2.SidIndex)",
                    items[w[0] as usize],
                    items[w[1] as usize],
                    sid(w[0] as usize)
                )));
            }
        }
        // Breadth-first over depths: the nodes of one depth are ranges of `order` sharing a prefix;
        // splitting each range by the next code gives its children, numbered consecutively.
        let mut first_child = Vec::new();
        let mut child_code = Vec::new();
        let mut child_node = Vec::new();
        let mut parent = vec![0u32];
        let mut leaf_count = vec![n as u32];
        let mut leaf_item = vec![0u64];
        let mut ranges: Vec<(usize, usize)> = vec![(0, n)];
        let mut next_id = 1u32;
        for depth in 0..levels {
            let base = first_child.len() as u32; // id of the first node of this depth
            let mut next_ranges = Vec::new();
            for (k, &(lo, hi)) in ranges.iter().enumerate() {
                first_child.push(child_code.len() as u32);
                let node = base + k as u32;
                let mut start = lo;
                while start < hi {
                    let code = sid(order[start] as usize)[depth];
                    let mut end = start + 1;
                    while end < hi && sid(order[end] as usize)[depth] == code {
                        end += 1;
                    }
                    child_code.push(code);
                    child_node.push(next_id);
                    parent.push(node);
                    leaf_count.push((end - start) as u32);
                    leaf_item.push(if depth + 1 == levels { items[order[start] as usize] } else { 0 });
                    next_ranges.push((start, end));
                    next_id += 1;
                    start = end;
                }
            }
            ranges = next_ranges;
        }
        // Leaves have no children.
        let leaves_first = first_child.len();
        for _ in leaves_first..next_id as usize {
            first_child.push(child_code.len() as u32);
        }
        first_child.push(child_code.len() as u32);
        for (node, &item) in leaf_item.iter().enumerate().skip(leaves_first) {
            item_leaf.insert(item, node as u32);
        }
        Ok(SidTrie { levels, first_child, child_code, child_node, parent, leaf_count, leaf_item, item_leaf })
    }

    pub fn levels(&self) -> usize {
        self.levels
    }

    pub fn len(&self) -> usize {
        self.leaf_count[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_nodes(&self) -> usize {
        self.parent.len()
    }

    fn children(&self, node: u32) -> std::ops::Range<usize> {
        self.first_child[node as usize] as usize..self.first_child[node as usize + 1] as usize
    }

    fn child(&self, node: u32, code: u16) -> Option<u32> {
        let r = self.children(node);
        // Children are sorted by code.
        self.child_code[r.clone()].binary_search(&code).ok().map(|k| self.child_node[r.start + k])
    }

    pub fn contains(&self, item: u64) -> bool {
        self.item_leaf.contains_key(&item)
    }
}

/// How many items below each node are already used (emitted or excluded). Dense for the small
/// per-request tries, sparse for a shared catalog trie.
#[derive(Debug, Clone)]
enum UsedCounts {
    Dense(Vec<u32>),
    Sparse(HashMap<u32, u32>),
}

impl UsedCounts {
    fn get(&self, node: u32) -> u32 {
        match self {
            UsedCounts::Dense(v) => v[node as usize],
            UsedCounts::Sparse(m) => m.get(&node).copied().unwrap_or(0),
        }
    }

    fn mark_leaf(&mut self, trie: &SidTrie, leaf: u32) {
        let mut node = leaf;
        loop {
            match self {
                UsedCounts::Dense(v) => v[node as usize] += 1,
                UsedCounts::Sparse(m) => *m.entry(node).or_insert(0) += 1,
            }
            if node == 0 {
                break;
            }
            node = trie.parent[node as usize];
        }
    }
}

/// Where free reasoning starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningStart {
    /// The completion opens with `<think>` (forced), then free text.
    Think,
    /// The prompt already ends with `<think>`: free text right away.
    InThink,
    /// No reasoning span: the completion starts at `<answer>` (or the first SID without tags).
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ThinkOpen,
    Reasoning,
    AnswerOpen,
    /// Between items: `<|sid_begin|>` while items remain to emit, else `</answer>` / EOS.
    ItemStart,
    /// Inside a SID at `node` (depth = level of the next code); at a leaf only `<|sid_end|>`.
    InSid(u32),
    Eos,
    /// After EOS: only EOS again (a sink, so padded batch rows stay well defined).
    Done,
}

/// The automaton of one request. Cheap to clone (the trie is shared), which is how beam search
/// and several returned sequences fork a request.
#[derive(Debug, Clone)]
pub struct DecodeState {
    tokens: Arc<TokenMap>,
    trie: Arc<SidTrie>,
    used: UsedCounts,
    phase: Phase,
    reasoning_tokens: u32,
    max_reasoning_tokens: u32,
    answer_tags: bool,
    n_items: usize,
    emitted: Vec<u64>,
}

/// Options shared by the rerank and catalog constructors.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub reasoning: ReasoningStart,
    pub max_reasoning_tokens: u32,
    /// Wrap the items in `<answer>...</answer>` (always true for reranking).
    pub answer_tags: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Framing { reasoning: ReasoningStart::Think, max_reasoning_tokens: 128, answer_tags: true }
    }
}

impl DecodeState {
    /// Rerank: emit every one of the K candidates exactly once, in any order.
    pub fn rerank(tokens: Arc<TokenMap>, candidates: &[u64], codes: &[u16], framing: Framing) -> Result<Self> {
        if candidates.is_empty() {
            return Err(Gr2Error::invalid("a rerank request needs at least one candidate"));
        }
        let trie = SidTrie::build(candidates, codes, tokens.levels).map_err(|e| match e {
            Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("candidates: {m}")),
            other => other,
        })?;
        check_codes_fit(&tokens, &trie)?;
        let used = UsedCounts::Dense(vec![0; trie.num_nodes()]);
        Ok(Self::start(tokens, Arc::new(trie), used, candidates.len(), framing))
    }

    /// Catalog: emit `n_items` distinct catalog items, none of them in `exclude`.
    pub fn catalog(
        tokens: Arc<TokenMap>,
        trie: Arc<SidTrie>,
        n_items: usize,
        exclude: &[u64],
        framing: Framing,
    ) -> Result<Self> {
        if trie.levels != tokens.levels {
            return Err(Gr2Error::invalid(format!(
                "catalog SIDs have {} levels, the token map {}",
                trie.levels, tokens.levels
            )));
        }
        if n_items == 0 {
            return Err(Gr2Error::invalid("n_items must be >= 1"));
        }
        let mut used = UsedCounts::Sparse(HashMap::new());
        let mut seen = std::collections::HashSet::new();
        for &item in exclude {
            // Excluding an item the catalog does not hold is a no-op by definition; repeats too.
            if let Some(&leaf) = trie.item_leaf.get(&item) {
                if seen.insert(item) {
                    used.mark_leaf(&trie, leaf);
                }
            }
        }
        let available = trie.len() - seen.len();
        if available < n_items {
            return Err(Gr2Error::Constraint(format!(
                "catalog mode asks for {n_items} items but only {available} of {} remain after exclusions",
                trie.len()
            )));
        }
        Ok(Self::start(tokens, trie, used, n_items, framing))
    }

    fn start(tokens: Arc<TokenMap>, trie: Arc<SidTrie>, used: UsedCounts, n_items: usize, framing: Framing) -> Self {
        let phase = match framing.reasoning {
            ReasoningStart::Think => Phase::ThinkOpen,
            ReasoningStart::InThink => Phase::Reasoning,
            ReasoningStart::Disabled if framing.answer_tags => Phase::AnswerOpen,
            ReasoningStart::Disabled => Phase::ItemStart,
        };
        DecodeState {
            tokens,
            trie,
            used,
            phase,
            reasoning_tokens: 0,
            max_reasoning_tokens: framing.max_reasoning_tokens,
            answer_tags: framing.answer_tags,
            n_items,
            emitted: Vec::with_capacity(n_items),
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// True while free text is allowed (the row's mask is the reasoning vocabulary).
    pub fn is_free(&self) -> bool {
        self.phase == Phase::Reasoning && self.reasoning_tokens < self.max_reasoning_tokens
    }

    pub fn in_sid(&self) -> bool {
        matches!(self.phase, Phase::InSid(_))
    }

    /// Items emitted so far, in order.
    pub fn emitted(&self) -> &[u64] {
        &self.emitted
    }

    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    fn describe(&self) -> String {
        match self.phase {
            Phase::ThinkOpen => "expecting <think>".into(),
            Phase::Reasoning => format!("reasoning ({} of {} tokens)", self.reasoning_tokens, self.max_reasoning_tokens),
            Phase::AnswerOpen => "expecting <answer>".into(),
            Phase::ItemStart => format!("between items ({} of {} emitted)", self.emitted.len(), self.n_items),
            Phase::InSid(node) => format!("inside a SID at node {node}, item {}", self.emitted.len() + 1),
            Phase::Eos => "expecting EOS".into(),
            Phase::Done => "finished".into(),
        }
    }

    fn available(&self, node: u32) -> bool {
        self.trie.leaf_count[node as usize] > self.used.get(node)
    }

    /// Calls `f` with each allowed token unless the state is free reasoning (use the reasoning row).
    fn for_each_sparse(&self, mut f: impl FnMut(u32)) -> Result<usize> {
        let t = &*self.tokens;
        let mut count = 0usize;
        let mut emit = |id: u32| {
            count += 1;
            f(id)
        };
        match self.phase {
            Phase::ThinkOpen => emit(t.think_open),
            Phase::Reasoning => emit(t.think_close), // budget exhausted (free rows never get here)
            Phase::AnswerOpen => emit(t.answer_open),
            Phase::ItemStart if self.emitted.len() < self.n_items => {
                if self.available(0) {
                    emit(t.sid_begin)
                }
            }
            Phase::ItemStart if self.answer_tags => emit(t.answer_close),
            Phase::ItemStart | Phase::Eos | Phase::Done => emit(t.eos),
            Phase::InSid(node) => {
                let depth = self.depth(node);
                if depth == self.trie.levels {
                    emit(t.sid_end)
                } else {
                    let ids = &t.code_ids[depth];
                    for k in self.trie.children(node) {
                        if self.available(self.trie.child_node[k]) {
                            emit(ids[self.trie.child_code[k] as usize]);
                        }
                    }
                }
            }
        }
        if count == 0 {
            return Err(Gr2Error::Constraint(format!(
                "no token is allowed in state {}; refusing to decode unconstrained",
                self.describe()
            )));
        }
        Ok(count)
    }

    fn depth(&self, mut node: u32) -> usize {
        let mut d = 0;
        while node != 0 {
            node = self.trie.parent[node as usize];
            d += 1;
        }
        d
    }

    /// Allowed token ids (sorted ascending). For free reasoning this is the whole reasoning
    /// vocabulary, so callers that only need the sparse case should check [`Self::is_free`].
    pub fn allowed(&self) -> Result<Vec<u32>> {
        if self.is_free() {
            let forbidden = self.tokens.reasoning_forbidden();
            let mut out = Vec::with_capacity(self.tokens.vocab_size - forbidden.len());
            let mut f = forbidden.iter().peekable();
            for t in 0..self.tokens.vocab_size as u32 {
                if f.peek() == Some(&&t) {
                    f.next();
                } else {
                    out.push(t);
                }
            }
            return Ok(out);
        }
        let mut out = Vec::new();
        self.for_each_sparse(|id| out.push(id))?;
        out.sort_unstable();
        Ok(out)
    }

    /// Write this state's bitmask row (`words` u32 words).
    pub fn fill_row(&self, row: &mut [u32]) -> Result<()> {
        if row.len() != self.tokens.words() {
            return Err(Gr2Error::invalid(format!(
                "bitmask row has {} words, expected ceil({} / 32) = {}",
                row.len(),
                self.tokens.vocab_size,
                self.tokens.words()
            )));
        }
        if self.is_free() {
            row.copy_from_slice(&self.tokens.reasoning_row);
            return Ok(());
        }
        row.fill(0);
        self.for_each_sparse(|id| row[id as usize / 32] |= 1 << (id % 32))?;
        Ok(())
    }

    /// Whether `token` is allowed now.
    pub fn allows(&self, token: u32) -> bool {
        if (token as usize) >= self.tokens.vocab_size {
            return false;
        }
        if self.is_free() {
            let row = &self.tokens.reasoning_row;
            return row[token as usize / 32] >> (token % 32) & 1 == 1;
        }
        let mut found = false;
        let _ = self.for_each_sparse(|id| found |= id == token);
        found
    }

    /// Feed one token. A token the constraint forbids is an error and leaves the state unchanged.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        if !self.allows(token) {
            return Err(Gr2Error::Constraint(format!(
                "token {} is not allowed in state {}",
                self.tokens.token_name(token),
                self.describe()
            )));
        }
        let t = &*self.tokens;
        self.phase = match self.phase {
            Phase::ThinkOpen => Phase::Reasoning,
            Phase::Reasoning if token == t.think_close => {
                if self.answer_tags {
                    Phase::AnswerOpen
                } else {
                    Phase::ItemStart
                }
            }
            Phase::Reasoning => {
                self.reasoning_tokens += 1;
                Phase::Reasoning
            }
            Phase::AnswerOpen => Phase::ItemStart,
            Phase::ItemStart if token == t.sid_begin => Phase::InSid(0),
            Phase::ItemStart if token == t.answer_close => Phase::Eos,
            Phase::ItemStart | Phase::Eos | Phase::Done => Phase::Done,
            Phase::InSid(node) if token == t.sid_end => {
                self.used.mark_leaf(&self.trie, node);
                self.emitted.push(self.trie.leaf_item[node as usize]);
                Phase::ItemStart
            }
            Phase::InSid(node) => {
                let (_, code) = t.code_of(token).expect("allowed code token");
                Phase::InSid(self.trie.child(node, code).expect("allowed child"))
            }
        };
        Ok(())
    }
}

fn check_codes_fit(tokens: &TokenMap, trie: &SidTrie) -> Result<()> {
    if trie.levels != tokens.levels {
        return Err(Gr2Error::invalid(format!(
            "SIDs have {} levels, the token map {}",
            trie.levels, tokens.levels
        )));
    }
    // Every child code at depth d must have a token.
    let mut stack = vec![(0u32, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth == trie.levels {
            continue;
        }
        for k in trie.children(node) {
            let code = trie.child_code[k] as usize;
            if code >= tokens.level_sizes[depth] {
                return Err(Gr2Error::invalid(format!(
                    "code {code} at level {depth} has no token (level size {})",
                    tokens.level_sizes[depth]
                )));
            }
            stack.push((trie.child_node[k], depth + 1));
        }
    }
    Ok(())
}

/// Build a catalog trie and check it against the token map.
pub fn catalog_trie(tokens: &TokenMap, items: &[u64], codes: &[u16]) -> Result<SidTrie> {
    let trie = SidTrie::build(items, codes, tokens.levels)?;
    check_codes_fit(tokens, &trie)?;
    Ok(trie)
}

/// Fill `out` (rows x words, row-major) with the masks of `states[rows[i]]`, in parallel.
pub fn fill_bitmask(states: &[DecodeState], rows: &[usize], out: &mut [u32], words: usize) -> Result<()> {
    if out.len() != rows.len() * words {
        return Err(Gr2Error::invalid(format!(
            "bitmask has {} words, expected {} rows x {words}",
            out.len(),
            rows.len()
        )));
    }
    check_rows(states.len(), rows)?;
    let fill = |(row, &r): (&mut [u32], &usize)| {
        states[r].fill_row(row).map_err(|e| match e {
            Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
            other => other,
        })
    };
    if rows.len() < PARALLEL_MIN_ROWS {
        out.chunks_mut(words.max(1)).zip(rows.iter()).try_for_each(fill)
    } else {
        out.par_chunks_mut(words.max(1)).zip(rows.par_iter()).with_min_len(16).try_for_each(fill)
    }
}

/// Below this many rows a call stays on the calling thread: handing work to the rayon pool costs
/// more than filling a few rows, and on a busy machine the wake-up latency dominates.
pub const PARALLEL_MIN_ROWS: usize = 64;

/// Allowed ids of each requested row as CSR (offsets of len rows+1, ids). Free-reasoning rows are
/// listed as empty with `free[i] = true` (their allowed set is the reasoning vocabulary).
pub fn allowed_lists(states: &[DecodeState], rows: &[usize]) -> Result<(Vec<i64>, Vec<i32>, Vec<bool>)> {
    check_rows(states.len(), rows)?;
    let list_of = |&r: &usize| if states[r].is_free() { Ok(Vec::new()) } else { states[r].allowed() };
    let lists: Vec<Result<Vec<u32>>> = if rows.len() < PARALLEL_MIN_ROWS {
        rows.iter().map(list_of).collect()
    } else {
        rows.par_iter().with_min_len(16).map(list_of).collect()
    };
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut ids = Vec::new();
    let mut free = Vec::with_capacity(rows.len());
    offsets.push(0);
    for (list, &r) in lists.into_iter().zip(rows) {
        let list = list.map_err(|e| match e {
            Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
            other => other,
        })?;
        ids.extend(list.iter().map(|&t| t as i32));
        offsets.push(ids.len() as i64);
        free.push(states[r].is_free());
    }
    Ok((offsets, ids, free))
}

/// Advance `states[rows[i]]` by `tokens[i]`: all or nothing (on error no state changes).
pub fn advance_rows(states: &mut [DecodeState], rows: &[usize], tokens: &[i64]) -> Result<()> {
    if rows.len() != tokens.len() {
        return Err(Gr2Error::invalid(format!("{} rows but {} tokens", rows.len(), tokens.len())));
    }
    check_rows(states.len(), rows)?;
    let mut seen = vec![false; states.len()];
    for &r in rows {
        if std::mem::replace(&mut seen[r], true) {
            return Err(Gr2Error::invalid(format!("row {r} advanced twice in one call")));
        }
    }
    for (&r, &tok) in rows.iter().zip(tokens) {
        if tok < 0 || tok > u32::MAX as i64 || !states[r].allows(tok as u32) {
            let mut probe = states[r].clone();
            let err = if tok < 0 || tok > u32::MAX as i64 {
                Gr2Error::Constraint(format!("token {tok} is not a valid id"))
            } else {
                probe.advance(tok as u32).expect_err("forbidden")
            };
            return Err(match err {
                Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
                other => other,
            });
        }
    }
    for (&r, &tok) in rows.iter().zip(tokens) {
        states[r].advance(tok as u32)?;
    }
    Ok(())
}

fn check_rows(n: usize, rows: &[usize]) -> Result<()> {
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(Gr2Error::invalid(format!("row {bad} out of range: the batch holds {n} states")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Vocabulary layout for tests: 0..20 text, 20..27 tags, then codes.
    fn token_map(levels: usize, size: usize, vocab: usize) -> Arc<TokenMap> {
        let mut next = 27i64;
        let code_ids = (0..levels)
            .map(|_| {
                (0..size)
                    .map(|_| {
                        next += 1;
                        next - 1
                    })
                    .collect()
            })
            .collect();
        Arc::new(
            TokenMap::new(TokenMapSpec {
                code_ids,
                sid_begin: 20,
                sid_end: 21,
                think_open: 22,
                think_close: 23,
                answer_open: 24,
                answer_close: 25,
                eos: 26,
                vocab_size: vocab.max(27 + levels * size),
                reasoning_vocab: None,
                forbidden_in_reasoning: vec![0],
            })
            .unwrap(),
        )
    }

    /// Reference: the set of allowed tokens computed naively from the emitted prefix.
    fn reference_allowed(tm: &TokenMap, cands: &[Vec<u16>], used: &[bool], prefix: &[u16]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        let l = prefix.len();
        if l == tm.levels {
            return vec![tm.sid_end];
        }
        for (c, u) in cands.iter().zip(used) {
            if !u && c[..l] == *prefix {
                out.push(tm.code_ids[l][c[l] as usize]);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn run_greedy_walk(tm: &Arc<TokenMap>, cands: &[Vec<u16>], choices: &[usize]) {
        let k = cands.len();
        let ids: Vec<u64> = (0..k as u64).map(|i| i * 7 + 3).collect();
        let flat: Vec<u16> = cands.iter().flatten().copied().collect();
        let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: true };
        let mut st = DecodeState::rerank(tm.clone(), &ids, &flat, framing).unwrap();
        assert_eq!(st.allowed().unwrap(), vec![tm.answer_open]);
        st.advance(tm.answer_open).unwrap();
        let mut used = vec![false; k];
        let mut pick = choices.iter().cycle();
        for _ in 0..k {
            assert_eq!(st.allowed().unwrap(), vec![tm.sid_begin]);
            st.advance(tm.sid_begin).unwrap();
            let mut prefix = Vec::new();
            loop {
                let expect = reference_allowed(tm, cands, &used, &prefix);
                let got = st.allowed().unwrap();
                assert_eq!(got, expect);
                let mut row = vec![0u32; tm.words()];
                st.fill_row(&mut row).unwrap();
                let from_row: Vec<u32> =
                    (0..tm.vocab_size as u32).filter(|&t| row[t as usize / 32] >> (t % 32) & 1 == 1).collect();
                assert_eq!(from_row, expect);
                let tok = got[*pick.next().unwrap() % got.len()];
                st.advance(tok).unwrap();
                if tok == tm.sid_end {
                    break;
                }
                prefix.push(tm.code_of(tok).unwrap().1);
            }
            let idx = cands.iter().zip(&used).position(|(c, u)| !u && *c == prefix).unwrap();
            used[idx] = true;
            assert_eq!(*st.emitted().last().unwrap(), ids[idx]);
        }
        assert_eq!(st.allowed().unwrap(), vec![tm.answer_close]);
        st.advance(tm.answer_close).unwrap();
        assert_eq!(st.allowed().unwrap(), vec![tm.eos]);
        st.advance(tm.eos).unwrap();
        assert!(st.is_done());
        let mut e = st.emitted().to_vec();
        e.sort_unstable();
        assert_eq!(e, ids);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

        #[test]
        fn rerank_matches_reference(
            levels in 1usize..4,
            raw in prop::collection::btree_set(prop::collection::vec(0u16..3, 3), 1..12),
            choices in prop::collection::vec(0usize..100, 1..20),
        ) {
            let tm = token_map(levels, 3, 100);
            let mut cands: Vec<Vec<u16>> = raw.into_iter().map(|c| c[..levels].to_vec()).collect();
            cands.sort();
            cands.dedup();
            run_greedy_walk(&tm, &cands, &choices);
        }
    }

    #[test]
    fn reasoning_budget_forces_think_close() {
        let tm = token_map(2, 4, 70);
        let framing = Framing { reasoning: ReasoningStart::Think, max_reasoning_tokens: 3, answer_tags: true };
        let mut st = DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 2, 3], framing).unwrap();
        assert!(st.advance(1).is_err());
        st.advance(tm.think_open).unwrap();
        assert!(st.is_free());
        assert!(!st.allows(0) && !st.allows(tm.eos) && !st.allows(tm.answer_open) && st.allows(tm.think_close));
        for t in [1, 2, 3] {
            st.advance(t).unwrap();
        }
        assert!(!st.is_free());
        assert_eq!(st.allowed().unwrap(), vec![tm.think_close]);
        assert!(matches!(st.advance(4), Err(Gr2Error::Constraint(_))));
        st.advance(tm.think_close).unwrap();
        assert_eq!(st.allowed().unwrap(), vec![tm.answer_open]);
    }

    #[test]
    fn duplicates_and_bad_codes_rejected() {
        let tm = token_map(2, 4, 70);
        let f = Framing::default();
        assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 5], &[0, 1, 2, 3], f), Err(Gr2Error::InvalidInput(_))));
        assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 0, 1], f), Err(Gr2Error::InvalidInput(_))));
        assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 0, 9], f), Err(Gr2Error::InvalidInput(_))));
        assert!(matches!(DecodeState::rerank(tm, &[], &[], f), Err(Gr2Error::InvalidInput(_))));
    }

    #[test]
    fn catalog_excludes_and_never_dead_ends() {
        let tm = token_map(2, 3, 60);
        // Items 0..9 with SIDs (a, b) for a, b in 0..3.
        let items: Vec<u64> = (0..9).collect();
        let codes: Vec<u16> = (0..9).flat_map(|i| [i as u16 / 3, i as u16 % 3]).collect();
        let trie = Arc::new(catalog_trie(&tm, &items, &codes).unwrap());
        let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: false };
        // Exclude the whole first subtree (0, *): its level-0 code must disappear.
        let mut st = DecodeState::catalog(tm.clone(), trie.clone(), 6, &[0, 1, 2, 42], framing).unwrap();
        for _ in 0..6 {
            st.advance(tm.sid_begin).unwrap();
            let first = st.allowed().unwrap();
            assert!(!first.contains(&tm.code_ids[0][0]));
            st.advance(first[0]).unwrap();
            let second = st.allowed().unwrap();
            st.advance(second[0]).unwrap();
            st.advance(tm.sid_end).unwrap();
        }
        assert_eq!(st.allowed().unwrap(), vec![tm.eos]);
        let mut e = st.emitted().to_vec();
        e.sort_unstable();
        assert_eq!(e, vec![3, 4, 5, 6, 7, 8]);
        assert!(matches!(
            DecodeState::catalog(tm, trie, 7, &[0, 1, 2], framing),
            Err(Gr2Error::Constraint(_))
        ));
    }

    #[test]
    fn batch_calls_are_all_or_nothing() {
        let tm = token_map(1, 4, 64);
        let f = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: true };
        let s = DecodeState::rerank(tm.clone(), &[1, 2], &[0, 1], f).unwrap();
        let mut states = vec![s.clone(), s];
        let err = advance_rows(&mut states, &[0, 1], &[tm.answer_open as i64, 3]);
        assert!(matches!(err, Err(Gr2Error::Constraint(_))));
        assert_eq!(states[0].allowed().unwrap(), vec![tm.answer_open]);
        let mut out = vec![0u32; 2 * tm.words()];
        fill_bitmask(&states, &[1, 0], &mut out, tm.words()).unwrap();
        assert_eq!(out[tm.answer_open as usize / 32], 1 << (tm.answer_open % 32));
        let (off, ids, free) = allowed_lists(&states, &[0, 1]).unwrap();
        assert_eq!(off, vec![0, 1, 2]);
        assert_eq!(ids, vec![tm.answer_open as i32; 2]);
        assert_eq!(free, vec![false, false]);
    }
}
