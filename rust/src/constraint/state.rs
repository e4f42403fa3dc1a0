//! [`DecodeState`]: the automaton of one request (module docs of `constraint`).

use std::collections::HashMap;
use std::sync::Arc;

use super::token_map::TokenMap;
use super::trie::{SidTrie, UsedCounts};
use crate::error::{Gr2Error, Result};

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
    /// The map's EOS (a map without one cannot decode: checked when the state is built).
    eos: u32,
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
        let eos = decoding_eos(&tokens)?;
        if candidates.is_empty() {
            return Err(Gr2Error::invalid("a rerank request needs at least one candidate"));
        }
        let trie = SidTrie::build(candidates, codes, tokens.levels).map_err(|e| match e {
            Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("candidates: {m}")),
            other => other,
        })?;
        check_codes_fit(&tokens, &trie)?;
        let used = UsedCounts::Dense(vec![0; trie.num_nodes()]);
        Ok(Self::start(tokens, eos, Arc::new(trie), used, candidates.len(), framing))
    }

    /// Catalog: emit `n_items` distinct catalog items, none of them in `exclude`.
    pub fn catalog(
        tokens: Arc<TokenMap>,
        trie: Arc<SidTrie>,
        n_items: usize,
        exclude: &[u64],
        framing: Framing,
    ) -> Result<Self> {
        let eos = decoding_eos(&tokens)?;
        check_codes_fit(&tokens, &trie).map_err(|e| match e {
            Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("trie: {m}")),
            other => other,
        })?;
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
        Ok(Self::start(tokens, eos, trie, used, n_items, framing))
    }

    fn start(tokens: Arc<TokenMap>, eos: u32, trie: Arc<SidTrie>, used: UsedCounts, n_items: usize, framing: Framing) -> Self {
        let phase = match framing.reasoning {
            ReasoningStart::Think => Phase::ThinkOpen,
            ReasoningStart::InThink => Phase::Reasoning,
            ReasoningStart::Disabled if framing.answer_tags => Phase::AnswerOpen,
            ReasoningStart::Disabled => Phase::ItemStart,
        };
        DecodeState {
            tokens,
            eos,
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
            Phase::ItemStart | Phase::Eos | Phase::Done => emit(self.eos),
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

/// The EOS id of a map that is to decode (a verification-only map has none).
fn decoding_eos(tokens: &TokenMap) -> Result<u32> {
    tokens.eos.ok_or_else(|| {
        Gr2Error::invalid("the token map has no eos: decoding ends with EOS, so build the TokenMap with eos=")
    })
}

/// Whether `tokens` has a token for every code of `trie`: the same number of levels, and each
/// level's size covers the trie's codes there. O(levels), so a shared catalog trie is checked
/// against each request's token map without walking it.
fn check_codes_fit(tokens: &TokenMap, trie: &SidTrie) -> Result<()> {
    if trie.levels != tokens.levels {
        return Err(Gr2Error::invalid(format!(
            "the SIDs have {} levels, the token map {}",
            trie.levels, tokens.levels
        )));
    }
    for (level, (&bound, &size)) in trie.level_code_bounds.iter().zip(&tokens.level_sizes).enumerate() {
        if bound > size {
            return Err(Gr2Error::invalid(format!(
                "code {} at level {level} has no token: the token map's level size is {size}",
                bound - 1
            )));
        }
    }
    Ok(())
}
