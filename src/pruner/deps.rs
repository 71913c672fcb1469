//! Channel dependency groups: which layers share a channel dimension, so that removing a
//! channel removes it everywhere it lives.

use crate::error::{Error, Result};
use crate::model::{Graph, NodeId, Op};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A run of channels along a node's channel (or feature) axis that belong to one channel
/// space: `channels` channels, each spanning `repeat` consecutive features (a Flatten turns a
/// channel into its `H·W` block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    space: usize,
    channels: usize,
    repeat: usize,
}

/// Union-find over channel spaces.
#[derive(Debug, Default)]
struct Spaces {
    parent: Vec<usize>,
    channels: Vec<usize>,
    blocked: Vec<Option<String>>,
}

impl Spaces {
    fn add(&mut self, channels: usize, blocked: Option<String>) -> usize {
        self.parent.push(self.parent.len());
        self.channels.push(channels);
        self.blocked.push(blocked);
        self.parent.len() - 1
    }
    fn find(&mut self, mut s: usize) -> usize {
        while self.parent[s] != s {
            self.parent[s] = self.parent[self.parent[s]];
            s = self.parent[s];
        }
        s
    }
    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[rb] = ra;
            if self.blocked[ra].is_none() {
                self.blocked[ra] = self.blocked[rb].take();
            }
        }
    }
    fn block(&mut self, s: usize, why: &str) {
        let r = self.find(s);
        if self.blocked[r].is_none() {
            self.blocked[r] = Some(why.to_string());
        }
    }
}

/// How a layer takes part in a channel group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// A Conv2d or Linear whose output channels are the group's channels.
    Producer(String),
    /// A BatchNorm2d whose channels `offset..offset + channels` are the group's.
    Norm {
        /// Node name.
        node: String,
        /// First channel of the group in the node's channels.
        offset: usize,
    },
    /// A depthwise convolution (one filter per channel) carrying the group's channels at
    /// `offset`.
    Depthwise {
        /// Node name.
        node: String,
        /// First channel of the group in the node's channels.
        offset: usize,
    },
    /// A Conv2d or Linear reading the group's channels as input: channel `c` is its input
    /// features `offset + c·repeat .. offset + (c + 1)·repeat`.
    Consumer {
        /// Node name.
        node: String,
        /// First input feature of the group.
        offset: usize,
        /// Input features per channel (1, or `H·W` after a Flatten).
        repeat: usize,
    },
}

/// Channels that must be pruned together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelGroup {
    /// Group index in [`DependencyGraph::groups`].
    pub id: usize,
    /// Number of channels.
    pub channels: usize,
    /// Every layer the group's channels live in.
    pub members: Vec<Member>,
    /// Why the group cannot be pruned (graph input or output, a custom op, a grouped
    /// convolution, mismatched residual shapes), or `None`.
    pub blocked: Option<String>,
}

impl ChannelGroup {
    /// Whether the group's channels can be removed.
    pub fn prunable(&self) -> bool {
        self.blocked.is_none() && self.producers().next().is_some()
    }

    /// The Conv2d / Linear layers whose output channels form the group.
    pub fn producers(&self) -> impl Iterator<Item = &str> {
        self.members.iter().filter_map(|m| match m {
            Member::Producer(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The BatchNorm layers on the group's channels (with offsets).
    pub fn norms(&self) -> impl Iterator<Item = (&str, usize)> {
        self.members.iter().filter_map(|m| match m {
            Member::Norm { node, offset } => Some((node.as_str(), *offset)),
            _ => None,
        })
    }

    /// A short name: the group's first producer.
    pub fn name(&self) -> &str {
        self.producers().next().unwrap_or("(no producer)")
    }
}

/// The channel groups of a graph.
#[derive(Clone, Debug)]
pub struct DependencyGraph {
    /// All groups, prunable or not.
    pub groups: Vec<ChannelGroup>,
}

impl DependencyGraph {
    /// The prunable groups.
    pub fn prunable(&self) -> impl Iterator<Item = &ChannelGroup> {
        self.groups.iter().filter(|g| g.prunable())
    }

    /// The group whose producers include layer `name`.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] when no group is produced by that layer.
    pub fn group_of(&self, name: &str) -> Result<&ChannelGroup> {
        self.groups
            .iter()
            .find(|g| g.producers().any(|p| p == name))
            .ok_or_else(|| Error::UnknownNode {
                node: "(channel groups)".into(),
                input: name.to_string(),
            })
    }

    /// A plain-text table of the groups: channels, members, and why a group is blocked.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for g in &self.groups {
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| match m {
                    Member::Producer(n) => n.clone(),
                    Member::Norm { node, .. } => format!("{node} (bn)"),
                    Member::Depthwise { node, .. } => format!("{node} (depthwise)"),
                    Member::Consumer { node, .. } => format!("→ {node}"),
                })
                .collect();
            let _ = writeln!(
                s,
                "group {:>2}: {:>4} channels  {}  [{}]",
                g.id,
                g.channels,
                g.blocked
                    .as_ref()
                    .map_or("prunable".to_string(), |b| format!("blocked: {b}")),
                members.join(", ")
            );
        }
        s
    }
}

/// Finds the channel groups of `graph`.
///
/// Rules: a Conv2d (one group) or Linear starts a group with its output channels and reads
/// its input's; BatchNorm, ReLU, ReLU6, pooling, Dropout pass channels through; a depthwise
/// convolution (groups = in = out) carries its input's channels; an Add ties the channels of
/// all its inputs; a Concat lays its inputs' channels side by side (offsets); a Flatten turns
/// each channel into its `H·W` block of features. The graph input, the graph output, a custom
/// op (or any other op) and a grouped convolution block the groups they touch; the group says
/// which node blocked it.
///
/// # Errors
/// None for graphs the crate builds; the `Result` covers future ops.
pub fn dependency_groups(graph: &Graph) -> Result<DependencyGraph> {
    let n = graph.nodes().len();
    let mut spaces = Spaces::default();
    let mut layouts: Vec<Vec<Block>> = Vec::with_capacity(n);
    // (space, member with its offset) pairs, resolved to groups at the end.
    let mut members: Vec<(usize, Member)> = Vec::new();
    let single = |space: usize, channels: usize| {
        vec![Block {
            space,
            channels,
            repeat: 1,
        }]
    };
    for (i, node) in graph.nodes().iter().enumerate() {
        let id = NodeId::from_index(i);
        let shape = graph.shape(id);
        let channels = shape.first().copied().unwrap_or(1);
        let input = |k: usize| layouts[node.inputs[k].index()].clone();
        let layout = match &node.op {
            Op::Input { .. } => {
                let s = spaces.add(channels, Some(format!("graph input `{}`", node.name)));
                single(s, channels)
            }
            Op::Conv2d(c) => {
                let lin = input(0);
                let depthwise = c.groups > 1
                    && c.groups == c.in_channels()
                    && c.out_channels() == c.in_channels();
                if depthwise {
                    let mut offset = 0;
                    for b in &lin {
                        members.push((
                            b.space,
                            Member::Depthwise {
                                node: node.name.clone(),
                                offset,
                            },
                        ));
                        offset += b.channels * b.repeat;
                    }
                    lin
                } else if c.groups > 1 {
                    let why = format!("grouped convolution `{}`", node.name);
                    for b in &lin {
                        spaces.block(b.space, &why);
                    }
                    single(spaces.add(channels, Some(why)), channels)
                } else {
                    consume(&mut members, &lin, &node.name);
                    let s = spaces.add(channels, None);
                    members.push((s, Member::Producer(node.name.clone())));
                    single(s, channels)
                }
            }
            Op::Linear(_) if graph.shape(node.inputs[0]).len() != 1 => {
                // Over the last axis of a rank > 1 value, the features are not the
                // channels (axis 0) that the rules here follow.
                let why = format!("linear `{}` over a rank > 1 input", node.name);
                for b in input(0) {
                    spaces.block(b.space, &why);
                }
                single(spaces.add(channels, Some(why)), channels)
            }
            Op::Linear(_) => {
                let lin = input(0);
                consume(&mut members, &lin, &node.name);
                let s = spaces.add(channels, None);
                members.push((s, Member::Producer(node.name.clone())));
                single(s, channels)
            }
            Op::BatchNorm2d(_) => {
                let lin = input(0);
                let mut offset = 0;
                for b in &lin {
                    members.push((
                        b.space,
                        Member::Norm {
                            node: node.name.clone(),
                            offset,
                        },
                    ));
                    offset += b.channels * b.repeat;
                }
                lin
            }
            Op::ReLU
            | Op::ReLU6
            | Op::MaxPool2d(_)
            | Op::AvgPool2d(_)
            | Op::GlobalAvgPool
            | Op::Dropout { .. } => input(0),
            Op::Flatten => {
                let inner: usize = graph.shape(node.inputs[0]).iter().skip(1).product();
                input(0)
                    .into_iter()
                    .map(|b| Block {
                        repeat: b.repeat * inner.max(1),
                        ..b
                    })
                    .collect()
            }
            Op::Add => {
                let first = input(0);
                let aligned = (1..node.inputs.len()).all(|k| {
                    let other = input(k);
                    other.len() == first.len()
                        && other
                            .iter()
                            .zip(&first)
                            .all(|(a, b)| a.channels == b.channels && a.repeat == b.repeat)
                });
                if aligned {
                    for k in 1..node.inputs.len() {
                        for (a, b) in input(k).iter().zip(&first) {
                            spaces.union(b.space, a.space);
                        }
                    }
                    first
                } else {
                    let why = format!("add `{}` of differently laid out inputs", node.name);
                    for k in 0..node.inputs.len() {
                        for b in input(k) {
                            spaces.block(b.space, &why);
                        }
                    }
                    single(spaces.add(channels, Some(why)), channels)
                }
            }
            Op::Concat => (0..node.inputs.len()).flat_map(input).collect(),
            op => {
                let why = format!("{} op `{}`", op.kind(), node.name);
                for k in 0..node.inputs.len() {
                    for b in input(k) {
                        spaces.block(b.space, &why);
                    }
                }
                single(spaces.add(channels, Some(why)), channels)
            }
        };
        layouts.push(layout);
    }
    let out = graph.node(graph.output_id());
    for b in layouts[graph.output_id().index()].clone() {
        spaces.block(b.space, &format!("graph output `{}`", out.name));
    }
    // One group per root space, in order of first appearance.
    let mut index: BTreeMap<usize, usize> = BTreeMap::new();
    let mut groups: Vec<ChannelGroup> = Vec::new();
    for s in 0..spaces.parent.len() {
        let r = spaces.find(s);
        if let std::collections::btree_map::Entry::Vacant(e) = index.entry(r) {
            e.insert(groups.len());
            groups.push(ChannelGroup {
                id: groups.len(),
                channels: spaces.channels[r],
                members: Vec::new(),
                blocked: spaces.blocked[r].clone(),
            });
        }
    }
    for (s, m) in members {
        let r = spaces.find(s);
        groups[index[&r]].members.push(m);
    }
    Ok(DependencyGraph { groups })
}

fn consume(members: &mut Vec<(usize, Member)>, layout: &[Block], node: &str) {
    let mut offset = 0;
    for b in layout {
        members.push((
            b.space,
            Member::Consumer {
                node: node.to_string(),
                offset,
                repeat: b.repeat,
            },
        ));
        offset += b.channels * b.repeat;
    }
}
