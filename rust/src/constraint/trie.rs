//! [`SidTrie`]: a compact prefix tree over a set of SIDs (the K candidates of one request, or a
//! whole catalog), and the per-request counts of used items below each node.

use std::collections::HashMap;

use super::token_map::check_sid_levels;
use crate::error::{Gr2Error, Result};

/// A prefix tree over unique SIDs. Node 0 is the root (depth 0); a node at depth `L` is a leaf and
/// stands for one item. It holds codes, not token ids: any [`super::TokenMap`] whose level sizes
/// cover its `level_code_bounds` can decode with it (checked where the two meet).
#[derive(Debug)]
pub struct SidTrie {
    pub(super) levels: usize,
    /// Per level: the largest code any SID uses there, plus one.
    pub(super) level_code_bounds: Vec<usize>,
    /// Children of node `n` are `first_child[n]..first_child[n + 1]` in `child_code`/`child_node`.
    pub(super) first_child: Vec<u32>,
    pub(super) child_code: Vec<u16>,
    pub(super) child_node: Vec<u32>,
    pub(super) parent: Vec<u32>,
    /// Items under each node.
    pub(super) leaf_count: Vec<u32>,
    /// Item id of each leaf node (0 for inner nodes).
    pub(super) leaf_item: Vec<u64>,
    /// item id -> leaf node.
    pub(super) item_leaf: HashMap<u64, u32>,
}

impl SidTrie {
    /// Build from `items` (n,) and their SIDs `codes` (n x levels, row-major).
    pub fn build(items: &[u64], codes: &[u16], levels: usize) -> Result<Self> {
        let n = items.len();
        check_sid_levels("codes", levels)?;
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
        let mut level_code_bounds = vec![0usize; levels];
        for sid in codes.chunks_exact(levels) {
            for (bound, &code) in level_code_bounds.iter_mut().zip(sid) {
                *bound = (*bound).max(code as usize + 1);
            }
        }
        Ok(SidTrie { levels, level_code_bounds, first_child, child_code, child_node, parent, leaf_count, leaf_item, item_leaf })
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

    pub(super) fn children(&self, node: u32) -> std::ops::Range<usize> {
        self.first_child[node as usize] as usize..self.first_child[node as usize + 1] as usize
    }

    pub(super) fn child(&self, node: u32, code: u16) -> Option<u32> {
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
pub(super) enum UsedCounts {
    Dense(Vec<u32>),
    Sparse(HashMap<u32, u32>),
}

impl UsedCounts {
    pub(super) fn get(&self, node: u32) -> u32 {
        match self {
            UsedCounts::Dense(v) => v[node as usize],
            UsedCounts::Sparse(m) => m.get(&node).copied().unwrap_or(0),
        }
    }

    pub(super) fn mark_leaf(&mut self, trie: &SidTrie, leaf: u32) {
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
