//! Circuits from edge scores, as the EAP-IG code selects them: the `n` edges with the largest
//! |score| (`top_n`), or grown greedily from the logits over a heap of incoming edges
//! (`greedy`), then pruned to the edges on some path from the input to the logits.
use std::collections::{BinaryHeap, HashSet};

use super::attribution::largest_first;
use super::edge_attribution::{Graph, Qkv, Receiver, Sender};

/// A node of the circuit graph: a sender's index, or the logits (`senders.len()`).
type Node = usize;

/// Edges (sender, receiver) of `graph` with a score each, in `graph.edges()` order.
pub struct Scored<'a> {
    pub graph: &'a Graph,
    pub edges: &'a [(usize, usize)],
    pub scores: &'a [f64],
}

impl Scored<'_> {
    fn logits(&self) -> Node {
        self.graph.senders.len()
    }

    /// The nodes whose input a receiver is: a key or value receiver of a grouped model is read
    /// by every query head of its group.
    fn receiver_nodes(&self, r: usize) -> Vec<Node> {
        let g = self.graph;
        let index = |s: Sender| g.senders.iter().position(|&x| x == s).expect("every head and MLP sends");
        match g.receivers[r] {
            Receiver::Logits => vec![self.logits()],
            Receiver::Mlp { layer } => vec![index(Sender::Mlp { layer })],
            Receiver::Head { layer, head, input: Qkv::Q } => vec![index(Sender::Head { layer, head })],
            Receiver::Head { layer, head, .. } => {
                let group = g.group();
                (head * group..(head + 1) * group).map(|h| index(Sender::Head { layer, head: h })).collect()
            }
        }
    }

    /// The `n` edges with the largest |score|, pruned.
    pub fn top_n(&self, n: usize) -> Vec<bool> {
        let mut keep = vec![false; self.edges.len()];
        for i in largest_first(self.scores, n) {
            keep[i] = true;
        }
        self.prune(&mut keep);
        keep
    }

    /// `n` edges added one at a time from the logits backwards: the candidate with the largest
    /// |score| among the edges into nodes already in the circuit; a sender reached for the first
    /// time brings all its incoming edges in as candidates. Then pruned.
    pub fn greedy(&self, n: usize) -> Vec<bool> {
        let mut into: Vec<Vec<usize>> = vec![Vec::new(); self.logits() + 1];
        for (i, &(_, r)) in self.edges.iter().enumerate() {
            for node in self.receiver_nodes(r) {
                into[node].push(i);
            }
        }
        // Max-heap on (|score|, lower edge index first).
        let key = |i: usize| (OrdF64(self.scores[i].abs()), std::cmp::Reverse(i));
        let mut heap: BinaryHeap<_> = into[self.logits()].iter().map(|&i| key(i)).collect();
        let mut queued: HashSet<usize> = into[self.logits()].iter().copied().collect();
        let mut reached: HashSet<Node> = HashSet::from([self.logits()]);
        let mut keep = vec![false; self.edges.len()];
        let mut added = 0;
        while added < n {
            let Some((_, std::cmp::Reverse(i))) = heap.pop() else { break };
            keep[i] = true;
            added += 1;
            let sender = self.edges[i].0;
            if reached.insert(sender) {
                for &j in &into[sender] {
                    if queued.insert(j) {
                        heap.push(key(j));
                    }
                }
            }
        }
        self.prune(&mut keep);
        keep
    }

    /// Keeps only edges on a path from the input to the logits: until nothing changes, a node
    /// stays when it sends along a kept edge and (but the input) receives along one, the logits
    /// always; an edge stays when its sender and one of its receiving nodes stay.
    pub fn prune(&self, keep: &mut [bool]) {
        let nodes = self.logits() + 1;
        let receivers: Vec<Vec<Node>> = (0..self.graph.receivers.len()).map(|r| self.receiver_nodes(r)).collect();
        loop {
            let (mut sends, mut receives) = (vec![false; nodes], vec![false; nodes]);
            for (i, &(s, r)) in self.edges.iter().enumerate() {
                if keep[i] {
                    sends[s] = true;
                    for &n in &receivers[r] {
                        receives[n] = true;
                    }
                }
            }
            let alive = |n: Node| n == self.logits() || (sends[n] && (n == 0 || receives[n]));
            let mut changed = false;
            for (i, &(s, r)) in self.edges.iter().enumerate() {
                if keep[i] && !(alive(s) && receivers[r].iter().any(|&n| alive(n))) {
                    keep[i] = false;
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// The nodes a circuit's edges touch (senders, and the logits where any edge reaches them).
    pub fn nodes(&self, keep: &[bool]) -> usize {
        let mut touched: HashSet<Node> = HashSet::new();
        for (i, &(s, r)) in self.edges.iter().enumerate() {
            if keep[i] {
                touched.insert(s);
                touched.extend(self.receiver_nodes(r));
            }
        }
        touched.len()
    }
}

/// f64 ordered by total_cmp, for the greedy heap.
#[derive(PartialEq)]
struct OrdF64(f64);

impl Eq for OrdF64 {}

impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    /// 2 layers, 2 heads, sequential blocks.
    fn graph() -> Graph {
        Graph::new(&ModelConfig::new(2, 8, 2, 4, 16, 32).unwrap())
    }

    fn edge(g: &Graph, edges: &[(usize, usize)], name: &str) -> usize {
        edges
            .iter()
            .position(|&(s, r)| format!("{}->{}", g.sender_name(g.senders[s]), g.receiver_name(g.receivers[r])) == name)
            .unwrap_or_else(|| panic!("no edge {name}"))
    }

    #[test]
    fn pruning_keeps_only_paths_from_the_input_to_the_logits() {
        let g = graph();
        let edges = g.edges();
        let mut scores = vec![0.0; edges.len()];
        // A path input -> a0.h1<v> -> (a0.h1) -> m1 -> logits, and a dangling a1.h0 -> logits
        // (a1.h0 receives nothing) and input -> m0 (m0 sends nothing).
        for (name, s) in [
            ("input->a0.h1<v>", 5.0),
            ("a0.h1->m1", 4.0),
            ("m1->logits", 3.0),
            ("a1.h0->logits", 2.5),
            ("input->m0", 2.0),
        ] {
            scores[edge(&g, &edges, name)] = s;
        }
        let scored = Scored { graph: &g, edges: &edges, scores: &scores };
        let kept = |keep: &[bool]| -> Vec<String> {
            let mut v: Vec<String> = (0..edges.len())
                .filter(|&i| keep[i])
                .map(|i| {
                    format!("{}->{}", g.sender_name(g.senders[edges[i].0]), g.receiver_name(g.receivers[edges[i].1]))
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(kept(&scored.top_n(5)), ["a0.h1->m1", "input->a0.h1<v>", "m1->logits"]);
        assert_eq!(scored.nodes(&scored.top_n(5)), 4);
        // The top 2 alone reach no logits: nothing is left.
        assert!(kept(&scored.top_n(2)).is_empty());
        // Greedy from the logits: m1->logits (3.0) first, which brings m1's inputs
        // (a0.h1->m1, 4.0), then a0.h1's (input->a0.h1<v>, 5.0).
        assert_eq!(kept(&scored.greedy(3)), ["a0.h1->m1", "input->a0.h1<v>", "m1->logits"]);
    }
}
