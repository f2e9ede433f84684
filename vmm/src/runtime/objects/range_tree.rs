//! A persistent (copy-on-write) B+tree of reserved ranges keyed by start.
//!
//! Why not a crate: the persistent maps of crates.io (`im`/`imbl`, `rpds`)
//! answer "the entry at or before this key" through a range iterator that
//! allocates its traversal stack, and that lookup runs on every guest exit,
//! which must not allocate. This tree looks up by plain descent, clones in
//! O(1) (one `Arc`), and an update copies only the nodes on one root-to-leaf
//! path, O(B log n), while snapshots taken earlier stay unchanged. The tests
//! check it against `BTreeMap`.
//!
//! Removal never merges nodes (an empty node is dropped), so the height is
//! bounded by the largest size the tree ever had; with the reservation limit
//! (16,384) and a fanout of 32 that is at most 4 levels.

use std::sync::Arc;

use super::Range;

/// Most entries of a node before it splits.
const FANOUT: usize = 32;

#[derive(Debug, Clone)]
enum Node {
    /// Ranges sorted by start.
    Leaf(Vec<Range>),
    /// Children with a lower bound of their keys, sorted; every key of child
    /// `i` is `>= bound_i` and `< bound_{i+1}`.
    Inner(Vec<(u64, Arc<Node>)>),
}

/// The tree. Cloning shares every node.
#[derive(Debug, Clone, Default)]
pub struct RangeTree {
    root: Option<Arc<Node>>,
    len: usize,
}

/// Index of the last bound `<= key` (0 when `key` is below all of them).
fn child_index(children: &[(u64, Arc<Node>)], key: u64) -> usize {
    children
        .partition_point(|(b, _)| *b <= key)
        .saturating_sub(1)
}

impl Node {
    /// The range with the greatest start `<= key`.
    fn at_or_before(&self, key: u64) -> Option<Range> {
        match self {
            Node::Leaf(v) => {
                let i = v.partition_point(|r| r.start <= key);
                i.checked_sub(1).map(|i| v[i])
            }
            Node::Inner(c) => {
                let i = child_index(c, key);
                // All keys of children before `i` are smaller than those of
                // child `i`; if `i` has none `<= key`, its left sibling's
                // last key is the answer.
                c[i].1.at_or_before(key).or_else(|| {
                    c[..i]
                        .iter()
                        .rev()
                        .find_map(|(_, n)| n.at_or_before(u64::MAX))
                })
            }
        }
    }

    /// The range with the smallest start `>= key`.
    fn at_or_after(&self, key: u64) -> Option<Range> {
        match self {
            Node::Leaf(v) => {
                let i = v.partition_point(|r| r.start < key);
                v.get(i).copied()
            }
            Node::Inner(c) => {
                let i = child_index(c, key);
                c[i..].iter().find_map(|(_, n)| n.at_or_after(key))
            }
        }
    }

    /// Inserts (the caller checked `r.start` is absent); returns the new
    /// right sibling when the node split.
    fn insert(&mut self, r: Range) -> Option<(u64, Arc<Node>)> {
        match self {
            Node::Leaf(v) => {
                let i = v.partition_point(|x| x.start < r.start);
                v.insert(i, r);
                (v.len() > FANOUT).then(|| {
                    let right = v.split_off(v.len() / 2);
                    (right[0].start, Arc::new(Node::Leaf(right)))
                })
            }
            Node::Inner(c) => {
                let i = child_index(c, r.start);
                if r.start < c[i].0 {
                    // Below every bound: the first child takes it.
                    c[i].0 = r.start;
                }
                let split = Arc::make_mut(&mut c[i].1).insert(r)?;
                c.insert(i + 1, split);
                (c.len() > FANOUT).then(|| {
                    let right = c.split_off(c.len() / 2);
                    (right[0].0, Arc::new(Node::Inner(right)))
                })
            }
        }
    }

    /// Removes the range starting at `start`; whether it was there.
    fn remove(&mut self, start: u64) -> bool {
        match self {
            Node::Leaf(v) => match v.binary_search_by_key(&start, |r| r.start) {
                Ok(i) => {
                    v.remove(i);
                    true
                }
                Err(_) => false,
            },
            Node::Inner(c) => {
                let i = child_index(c, start);
                let removed = Arc::make_mut(&mut c[i].1).remove(start);
                if removed && c[i].1.is_empty() && c.len() > 1 {
                    c.remove(i);
                }
                removed
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Leaf(v) => v.is_empty(),
            Node::Inner(c) => c.iter().all(|(_, n)| n.is_empty()),
        }
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Range>) {
        match self {
            Node::Leaf(v) => out.extend(v.iter()),
            Node::Inner(c) => c.iter().for_each(|(_, n)| n.collect(out)),
        }
    }
}

impl RangeTree {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range with the greatest start `<= key`. Allocates nothing.
    pub fn at_or_before(&self, key: u64) -> Option<Range> {
        self.root.as_ref()?.at_or_before(key)
    }

    /// The range with the smallest start `>= key`.
    pub fn at_or_after(&self, key: u64) -> Option<Range> {
        self.root.as_ref()?.at_or_after(key)
    }

    /// Inserts `r`; false (and no change) when a range starts at `r.start`.
    pub fn insert(&mut self, r: Range) -> bool {
        if self
            .at_or_before(r.start)
            .is_some_and(|x| x.start == r.start)
        {
            return false;
        }
        let root = self
            .root
            .get_or_insert_with(|| Arc::new(Node::Leaf(Vec::new())));
        if let Some(split) = Arc::make_mut(root).insert(r) {
            let left = Arc::clone(root);
            let bound = match &*left {
                Node::Leaf(v) => v[0].start,
                Node::Inner(c) => c[0].0,
            };
            *root = Arc::new(Node::Inner(vec![(bound, left), split]));
        }
        self.len += 1;
        true
    }

    /// Removes the range starting exactly at `start`; whether it was there.
    pub fn remove(&mut self, start: u64) -> bool {
        let Some(root) = self.root.as_mut() else {
            return false;
        };
        let removed = Arc::make_mut(root).remove(start);
        if removed {
            self.len -= 1;
            if self.len == 0 {
                self.root = None;
            }
        }
        removed
    }

    /// Every range, by start.
    pub fn iter(&self) -> std::vec::IntoIter<&Range> {
        let mut out = Vec::with_capacity(self.len);
        if let Some(root) = &self.root {
            root.collect(&mut out);
        }
        out.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn range(start: u64) -> Range {
        Range {
            start,
            length: 1 + start % 7,
            async_write: start.is_multiple_of(3),
            coalesced: false,
        }
    }

    /// A deterministic pseudo-random sequence (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn check_equal(tree: &RangeTree, reference: &BTreeMap<u64, Range>, rng: &mut Rng) {
        assert_eq!(tree.len(), reference.len());
        assert!(tree.iter().copied().eq(reference.values().copied()));
        for _ in 0..64 {
            let key = rng.next() % 5000;
            assert_eq!(
                tree.at_or_before(key),
                reference.range(..=key).next_back().map(|(_, r)| *r),
                "at_or_before({key})"
            );
            assert_eq!(
                tree.at_or_after(key),
                reference.range(key..).next().map(|(_, r)| *r),
                "at_or_after({key})"
            );
        }
    }

    #[test]
    fn matches_btreemap_under_random_inserts_and_removes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut tree = RangeTree::default();
        let mut reference = BTreeMap::new();
        for step in 0..20_000 {
            let key = rng.next() % 4000;
            // Inserts win two to one until the middle, then removes do.
            let insert = rng.next().is_multiple_of(3) != (step < 10_000);
            if insert {
                let fresh = !reference.contains_key(&key);
                assert_eq!(tree.insert(range(key)), fresh);
                reference.entry(key).or_insert(range(key));
            } else {
                assert_eq!(tree.remove(key), reference.remove(&key).is_some());
            }
            if step % 500 == 0 {
                check_equal(&tree, &reference, &mut rng);
            }
        }
        check_equal(&tree, &reference, &mut rng);
        for key in reference.keys().copied().collect::<Vec<_>>() {
            assert!(tree.remove(key));
            reference.remove(&key);
        }
        check_equal(&tree, &reference, &mut rng);
        assert!(tree.is_empty() && tree.at_or_before(u64::MAX).is_none());
    }

    #[test]
    fn snapshots_do_not_change_when_the_tree_does() {
        let mut rng = Rng(7);
        let mut tree = RangeTree::default();
        let mut reference = BTreeMap::new();
        let mut snapshots = Vec::new();
        for i in 0..3000 {
            let key = rng.next() % 10_000;
            if tree.insert(range(key)) {
                reference.insert(key, range(key));
            }
            if i % 7 == 0 {
                let gone = rng.next() % 10_000;
                tree.remove(gone);
                reference.remove(&gone);
            }
            if i % 300 == 0 {
                snapshots.push((tree.clone(), reference.clone()));
            }
        }
        for (snap, r) in &snapshots {
            check_equal(snap, r, &mut rng);
        }
    }

    #[test]
    fn ascending_and_descending_fills_split_correctly() {
        let mut rng = Rng(3);
        for keys in [
            (0..5000u64).collect::<Vec<_>>(),
            (0..5000u64).rev().collect(),
        ] {
            let mut tree = RangeTree::default();
            let mut reference = BTreeMap::new();
            for k in keys {
                assert!(tree.insert(range(k * 16)));
                reference.insert(k * 16, range(k * 16));
            }
            check_equal(&tree, &reference, &mut rng);
        }
    }
}
