//! Fjord's filters and projections. A filter is a condition on a record's envelope in a
//! bounded subset of CEL's syntax (`value.status == "placed" && value.total_cents >= 1000`);
//! a projection picks the parts of `value` a client receives (`id,customer.name`). Both are
//! compiled once, checked against [`Limits`], and have a canonical text, so that a server
//! can share one compiled form among every connection that asks for the same thing. The
//! language is described in docs/filters.md.

mod ast;
mod error;
mod eval;
mod lexer;
mod parser;
mod projection;
#[cfg(test)]
mod tests;

use std::hash::{Hash, Hasher};

use serde_json::{Map, Value};

pub use error::{FilterError, Reason};
pub use projection::Projection;

/// How large a filter or projection may be. Every limit bounds the work of compiling, and
/// with it the work of evaluating: at most `max_terms` nodes, each linear in the record.
/// The manifest's `server.filter_limits`, each field defaulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The source's length in bytes (default 1024).
    pub max_length: usize,
    /// How deeply parentheses, `!`, calls and lists nest, and how many names a projection's
    /// path has (default 32). The parser recurses this deep: keep it in the hundreds at most.
    pub max_depth: usize,
    /// Names, literals, operators and path steps in a filter (default 256).
    pub max_terms: usize,
    /// Elements of one list literal (default 64).
    pub max_list: usize,
    /// Paths in one projection (default 64).
    pub max_fields: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_length: 1024,
            max_depth: 32,
            max_terms: 256,
            max_list: 64,
            max_fields: 64,
        }
    }
}

/// The parts of one record a filter reads, borrowed: the envelope's fields.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
    /// Milliseconds since the epoch, if the record carries a timestamp.
    pub timestamp: Option<i64>,
    /// The key as the envelope shows it (a string, `{"base64": …}` or decoded JSON); `None`
    /// when the record has none, which filters see as `null`.
    pub key: Option<&'a Value>,
    /// The headers as the envelope shows them: name to value, or to an array of values.
    pub headers: &'a Map<String, Value>,
    /// The value as the envelope shows it; `null` for a tombstone.
    pub value: &'a Value,
}

impl<'a> RecordView<'a> {
    /// The view of a parsed envelope (`{"topic":…,"partition":…,…}`); `None` if it does not
    /// have the envelope's shape.
    pub fn from_envelope(envelope: &'a Value) -> Option<Self> {
        let envelope = envelope.as_object()?;
        Some(Self {
            topic: envelope.get("topic")?.as_str()?,
            partition: i32::try_from(envelope.get("partition")?.as_i64()?).ok()?,
            offset: envelope.get("offset")?.as_i64()?,
            timestamp: match envelope.get("timestamp") {
                None | Some(Value::Null) => None,
                Some(timestamp) => Some(timestamp.as_i64()?),
            },
            key: envelope.get("key").filter(|key| !key.is_null()),
            headers: envelope.get("headers")?.as_object()?,
            value: envelope.get("value")?,
        })
    }
}

/// A compiled filter.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: ast::Expr,
    canonical: String,
}

impl Filter {
    /// Compiles `source`, or says where and why it is not a filter.
    pub fn compile(source: &str, limits: &Limits) -> Result<Self, FilterError> {
        Ok(Self::from_expr(parser::parse(source, limits)?))
    }

    fn from_expr(expr: ast::Expr) -> Self {
        let canonical = expr.canonical();
        Self { expr, canonical }
    }

    /// Whether the record passes. A filter that is undefined for the record (a missing
    /// field, an ordering of a string with a number) does not pass.
    pub fn matches(&self, record: &RecordView<'_>) -> bool {
        eval::matches(&self.expr, record)
    }

    /// The filter's normal form, which compiles to the same filter: equal for filters that
    /// differ only in spacing, quotes, escapes, redundant parentheses or how `&&` and `||`
    /// chains are grouped.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The filter that passes what every one of `filters` passes; `None` for none.
    pub fn all(filters: impl IntoIterator<Item = Filter>) -> Option<Filter> {
        filters.into_iter().reduce(Filter::and)
    }

    /// A filter that passes what both pass (the manifest's, the token's and the query's
    /// filters are combined so). A conjunct already in `self` is not repeated. The result is
    /// not checked against any [`Limits`]: each part was.
    #[must_use]
    pub fn and(self, other: Filter) -> Filter {
        let mut operands = match self.expr {
            ast::Expr::And(operands) => operands,
            single => vec![single],
        };
        let others = match other.expr {
            ast::Expr::And(others) => others,
            single => vec![single],
        };
        for operand in others {
            if !operands.contains(&operand) {
                operands.push(operand);
            }
        }
        Self::from_expr(ast::Expr::join(false, operands))
    }
}

impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for Filter {}

impl Hash for Filter {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}
