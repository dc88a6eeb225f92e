//! Why a filter or a projection was refused, and where: the byte offset for programs and the
//! column for people, in a message that reads well in a JSON 400 body.

/// A filter or projection that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {reason}")]
pub struct FilterError {
    /// Byte offset into the source where the problem starts (0-based).
    pub position: usize,
    /// The same place counted in characters (1-based), as an editor shows it.
    pub column: usize,
    /// What is wrong there.
    pub reason: Reason,
}

impl FilterError {
    /// An error at byte `position` of `source`; a position past the end or inside a
    /// character is moved back to the nearest character boundary.
    pub(crate) fn at(source: &str, position: usize, reason: Reason) -> Self {
        let mut position = position.min(source.len());
        while !source.is_char_boundary(position) {
            position -= 1;
        }
        let column = source[..position].chars().count() + 1;
        Self {
            position,
            column,
            reason,
        }
    }
}

/// What is wrong with a filter or projection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// The source is longer than [`Limits::max_length`](crate::Limits::max_length).
    #[error("longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// Parentheses, `!`, calls or lists nest deeper than the limit.
    #[error("nested deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// More names, operators, literals and path steps than the limit.
    #[error("more than {limit} terms")]
    TooManyTerms {
        /// The limit.
        limit: usize,
    },
    /// A list literal with more elements than the limit.
    #[error("a list of more than {limit} elements")]
    ListTooLong {
        /// The limit.
        limit: usize,
    },
    /// A projection of more paths than the limit.
    #[error("more than {limit} fields")]
    TooManyFields {
        /// The limit.
        limit: usize,
    },
    /// The source is empty or only spaces.
    #[error("empty")]
    Empty,
    /// A character that starts no token.
    #[error("unexpected character {0:?}")]
    UnexpectedChar(char),
    /// A character that is close to an operator the language has, e.g. `=` for `==`.
    #[error("unexpected '{found}': did you mean '{suggestion}'?")]
    DidYouMean {
        /// What was written.
        found: &'static str,
        /// The operator the language has.
        suggestion: &'static str,
    },
    /// A string literal without its closing quote.
    #[error("unterminated string")]
    UnterminatedString,
    /// A backslash sequence CEL does not define, or one that names no character.
    #[error("invalid escape in string")]
    InvalidEscape,
    /// A number literal that is malformed or out of range.
    #[error("invalid number: {0}")]
    InvalidNumber(&'static str),
    /// The parser wanted something else here.
    #[error("expected {expected}, found {found}")]
    Expected {
        /// What would have fit.
        expected: &'static str,
        /// What was there, as written (or "the end").
        found: String,
    },
    /// A name that is not one of the record's parts.
    #[error(
        "unknown name '{0}': a path starts with value, key, headers, topic, partition, offset or timestamp"
    )]
    UnknownName(String),
    /// A function or method the language does not have.
    #[error("unknown function '{0}'")]
    UnknownFunction(String),
    /// A function or method given the wrong number of arguments.
    #[error("{function}() takes {expected}")]
    Arguments {
        /// The function.
        function: &'static str,
        /// How many arguments it takes, in words.
        expected: &'static str,
    },
    /// `has()` of something other than a field of `value`, `key` or `headers`.
    #[error("has() takes a field path, e.g. has(value.status)")]
    HasNeedsField,
    /// `.field` or `[…]` after `topic`, `partition`, `offset` or `timestamp`, which are scalars.
    #[error("{0} has no fields")]
    NoFields(&'static str),
    /// `a == b == c` and the like, which CEL reads as comparing a boolean.
    #[error("comparisons do not chain: add parentheses")]
    ChainedComparison,
    /// A minus sign before something that is not a number literal (there is no arithmetic).
    #[error("'-' only goes before a number")]
    MinusNotNumber,
    /// An operand that can never be true or false where a condition is needed.
    #[error("a condition is needed here, not a {0}")]
    NotACondition(&'static str),
    /// A list element that is not a literal.
    #[error("list elements must be literals")]
    ListNotLiteral,
}
