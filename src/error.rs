//! The crate's one error type.
//!
//! Every fallible public function returns [`Result<T>`]. Variants carry the context a user
//! needs to find the problem: the op, the node or tensor name, the expected and actual shapes.

use std::path::PathBuf;

/// Everything that can go wrong in nncompress.
///
/// The enum is `#[non_exhaustive]`: later versions add variants without a breaking change,
/// so match it with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape does not fit the operation it is given to.
    #[error("shape mismatch in {op}{}: expected {expected}, got {got:?}", node_suffix(.node))]
    ShapeMismatch {
        /// The operation that checked the shape (`"conv2d"`, `"add"`, `"forward"`, ...).
        op: String,
        /// The graph node involved, when there is one.
        node: Option<String>,
        /// What was expected, in words or as a shape (`"[N, 1, 28, 28]"`).
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A configuration value is out of its valid range (zero stride, groups not dividing
    /// channels, dropout probability outside `[0, 1)`, ...).
    #[error("invalid configuration for {what}: {reason}")]
    InvalidConfig {
        /// What was being configured.
        what: String,
        /// Why the value is rejected.
        reason: String,
    },
    /// A node refers to an input that does not exist.
    #[error("node `{node}` refers to unknown node `{input}`")]
    UnknownNode {
        /// The node whose input list is wrong (empty when the lookup came from elsewhere).
        node: String,
        /// The name that could not be found.
        input: String,
    },
    /// Two nodes share a name; names must be unique because parameters are addressed by them.
    #[error("duplicate node name `{0}`")]
    DuplicateNode(String),
    /// The graph's edges form a cycle.
    #[error("the graph has a cycle through nodes {nodes:?}")]
    Cycle {
        /// The nodes that could not be ordered.
        nodes: Vec<String>,
    },
    /// The graph has no input node (or, for a single-input API such as
    /// [`crate::model::Graph::forward`], more than one).
    #[error("the graph must have exactly one input node here, found {found}")]
    InputCount {
        /// How many input nodes were found.
        found: usize,
    },
    /// An op received the wrong number of inputs.
    #[error("node `{node}` ({op}) takes {expected} input(s), got {got}")]
    Arity {
        /// The node.
        node: String,
        /// The op kind.
        op: String,
        /// The number of inputs the op takes, in words.
        expected: String,
        /// The number of inputs given.
        got: usize,
    },
    /// A data set or batch list is empty where data is required.
    #[error("empty input: {0}")]
    Empty(String),
    /// Data contains NaN or infinity where finite numbers are required.
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// A label is outside the number of classes.
    #[error("label {label} at index {index} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// Index of the sample in the batch or data set.
        index: usize,
        /// The label found.
        label: usize,
        /// The number of classes.
        classes: usize,
    },
    /// A weights file lacks a tensor the graph needs.
    #[error("tensor `{0}` is missing from the weights file")]
    MissingTensor(String),
    /// A weights file holds a tensor the graph does not know.
    #[error("tensor `{0}` in the weights file matches no parameter of the graph")]
    UnexpectedTensor(String),
    /// A stored tensor's shape differs from the graph's parameter.
    #[error("tensor `{name}` has shape {got:?}, the graph expects {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The parameter's shape in the graph.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A stored tensor has a dtype the crate cannot read as f32.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// A file is malformed: bad magic, inconsistent header, truncated data.
    #[error("corrupt file {}: {reason}", path_or_stream(.path))]
    CorruptFile {
        /// The file, when reading from a path.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// An op was given a value of the wrong element type (an integer mask where floats are
    /// needed, floats where token ids are).
    #[error("node `{node}` ({op}) takes {expected} as input {input}, got {found}")]
    DtypeMismatch {
        /// The node.
        node: String,
        /// The op kind.
        op: String,
        /// Which input (0 is the first).
        input: usize,
        /// The element type the op takes there.
        expected: crate::tensor::DType,
        /// The element type it was given.
        found: crate::tensor::DType,
    },
    /// An integer index (a token id) is outside the table it selects from.
    #[error("node `{node}`: index {index} is outside 0..{len}")]
    IndexOutOfRange {
        /// The node.
        node: String,
        /// The index found.
        index: i64,
        /// The table's length.
        len: usize,
    },
    /// The values given to a graph's inputs do not fit them: a missing or unknown input
    /// name, a wrong element type or shape, dynamic sizes that differ between inputs.
    #[error("graph input `{input}`: {reason}")]
    BadInput {
        /// The input's name.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// An operation is not available for this op or configuration.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A size read from a file or asked for by a call passes a documented resource limit
    /// (see [`crate::limits::Limits`]); raise the limit if the input is trusted.
    #[error("{what}: {requested} exceeds the limit of {limit} (see nncompress::limits::Limits)")]
    LimitExceeded {
        /// What was being sized (`"tensor `fc1.weight` elements"`, `"decompressed bytes"`).
        what: String,
        /// The limit in force.
        limit: u64,
        /// What the input asked for (saturated at `u64::MAX`).
        requested: u64,
    },
    /// An I/O error, with the path involved.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn node_suffix(node: &Option<String>) -> String {
    node.as_ref()
        .map(|n| format!(" at node `{n}`"))
        .unwrap_or_default()
}

fn path_or_stream(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(in memory)".to_string())
}

impl Error {
    /// Shorthand for [`Error::ShapeMismatch`].
    pub(crate) fn shape(
        op: &str,
        node: Option<&str>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Self {
        Error::ShapeMismatch {
            op: op.to_string(),
            node: node.map(str::to_string),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::CorruptFile`].
    pub(crate) fn corrupt(path: Option<&std::path::Path>, reason: impl Into<String>) -> Self {
        Error::CorruptFile {
            path: path.map(std::path::Path::to_path_buf),
            reason: reason.into(),
        }
    }

    /// Attaches a path to an I/O error.
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
