//! The compiled form of a filter: a small tree with paths already split into steps and
//! literals already decoded into JSON values, and its canonical text, which is how two
//! filters that differ only in spacing, quoting or redundant parentheses are told equal.

use std::fmt::Write as _;

use serde_json::Value;

/// One node of a filter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    /// `null`, `true`, `false`, a number, a string, or a list of literals.
    Literal(Value),
    Path(Path),
    Not(Box<Expr>),
    /// Two or more operands; nested conjunctions are flattened into one.
    And(Vec<Expr>),
    /// Two or more operands; nested disjunctions are flattened into one.
    Or(Vec<Expr>),
    Relation(Relation, Box<Expr>, Box<Expr>),
    /// `has(path)`: whether the path leads somewhere.
    Has(Path),
    Size(Box<Expr>),
    /// A string method: receiver, then argument.
    Text(TextTest, Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Joins operands with `&&` (`or == false`) or `||`, flattening operands that are already
    /// joins of the same kind, so that grouping never changes the canonical form.
    pub(crate) fn join(or: bool, operands: Vec<Expr>) -> Expr {
        let mut flat = Vec::with_capacity(operands.len());
        for operand in operands {
            match (or, operand) {
                (false, Expr::And(inner)) | (true, Expr::Or(inner)) => flat.extend(inner),
                (_, operand) => flat.push(operand),
            }
        }
        if flat.len() == 1
            && let Some(only) = flat.pop()
        {
            return only;
        }
        if or { Expr::Or(flat) } else { Expr::And(flat) }
    }

    /// What the operand is when it can never be a boolean, named for an error message.
    pub(crate) fn never_boolean(&self) -> Option<&'static str> {
        match self {
            Expr::Literal(Value::Bool(_)) => None,
            Expr::Literal(literal) => Some(kind_of(literal)),
            Expr::Size(_) => Some("number"),
            Expr::Path(path) => path.root.scalar().map(|(_, kind)| kind),
            _ => None,
        }
    }

    /// Binding strength when printed: higher binds tighter.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(_) => 1,
            Expr::And(_) => 2,
            Expr::Relation(..) => 3,
            Expr::Not(_) => 4,
            // A negative number is a minus sign and a number, which takes no `.method()`.
            Expr::Literal(Value::Number(number))
                if number.as_i64().is_some_and(|n| n < 0)
                    || (number.is_f64() && number.as_f64().is_some_and(f64::is_sign_negative)) =>
            {
                4
            }
            _ => 5,
        }
    }

    /// Writes the canonical form, parenthesised if it binds looser than `context`.
    fn write(&self, out: &mut String, context: u8) {
        let parenthesise = self.precedence() < context;
        if parenthesise {
            out.push('(');
        }
        match self {
            Expr::Literal(literal) => write_literal(out, literal),
            Expr::Path(path) => path.write(out),
            Expr::Not(operand) => {
                out.push('!');
                operand.write(out, 4);
            }
            Expr::And(operands) | Expr::Or(operands) => {
                let (separator, inner) = match self {
                    Expr::And(_) => (" && ", 3),
                    _ => (" || ", 2),
                };
                for (i, operand) in operands.iter().enumerate() {
                    if i > 0 {
                        out.push_str(separator);
                    }
                    operand.write(out, inner);
                }
            }
            Expr::Relation(relation, left, right) => {
                left.write(out, 4);
                out.push(' ');
                out.push_str(relation.symbol());
                out.push(' ');
                right.write(out, 4);
            }
            Expr::Has(path) => {
                out.push_str("has(");
                path.write(out);
                out.push(')');
            }
            Expr::Size(operand) => {
                out.push_str("size(");
                operand.write(out, 1);
                out.push(')');
            }
            Expr::Text(test, receiver, argument) => {
                receiver.write(out, 5);
                out.push('.');
                out.push_str(test.name());
                out.push('(');
                argument.write(out, 1);
                out.push(')');
            }
        }
        if parenthesise {
            out.push(')');
        }
    }

    /// The canonical text: one space around binary operators, none elsewhere, only the
    /// parentheses precedence needs, strings in double quotes with the fewest escapes.
    pub(crate) fn canonical(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 1);
        out
    }
}

/// `==`, `!=`, `<`, `<=`, `>`, `>=` and `in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relation {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

impl Relation {
    fn symbol(self) -> &'static str {
        match self {
            Self::Eq => "==",
            Self::Ne => "!=",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::In => "in",
        }
    }
}

/// The string methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextTest {
    StartsWith,
    EndsWith,
    Contains,
}

impl TextTest {
    pub(crate) fn named(name: &str) -> Option<Self> {
        match name {
            "startsWith" => Some(Self::StartsWith),
            "endsWith" => Some(Self::EndsWith),
            "contains" => Some(Self::Contains),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::StartsWith => "startsWith",
            Self::EndsWith => "endsWith",
            Self::Contains => "contains",
        }
    }
}

/// A part of the record, then the steps into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Path {
    pub(crate) root: Root,
    pub(crate) steps: Vec<Step>,
}

impl Path {
    fn write(&self, out: &mut String) {
        out.push_str(self.root.name());
        write_steps(out, &self.steps);
    }
}

/// Writes steps as `.name` where the name is an identifier, else `["name"]`, and `[index]`.
fn write_steps(out: &mut String, steps: &[Step]) {
    for step in steps {
        match step {
            Step::Field(name) => write_field(out, name, false),
            Step::Index(index) => {
                let _ = write!(out, "[{index}]");
            }
        }
    }
}

/// Writes a member's name: `.name` (or just `name` as a path's `first`) where it is an
/// identifier, else `["name"]`.
pub(crate) fn write_field(out: &mut String, name: &str, first: bool) {
    if is_identifier(name) {
        if !first {
            out.push('.');
        }
        out.push_str(name);
    } else {
        out.push('[');
        write_string(out, name);
        out.push(']');
    }
}

/// The part of the record a path starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Root {
    Value,
    Key,
    Headers,
    Topic,
    Partition,
    Offset,
    Timestamp,
}

impl Root {
    pub(crate) fn named(name: &str) -> Option<Self> {
        let root = match name {
            "value" => Self::Value,
            "key" => Self::Key,
            "headers" => Self::Headers,
            "topic" => Self::Topic,
            "partition" => Self::Partition,
            "offset" => Self::Offset,
            "timestamp" => Self::Timestamp,
            _ => return None,
        };
        Some(root)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::Key => "key",
            Self::Headers => "headers",
            Self::Topic => "topic",
            Self::Partition => "partition",
            Self::Offset => "offset",
            Self::Timestamp => "timestamp",
        }
    }

    /// The roots that hold no fields, with what they hold.
    pub(crate) fn scalar(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Value | Self::Key | Self::Headers => None,
            Self::Topic => Some(("topic", "string")),
            Self::Partition | Self::Offset | Self::Timestamp => Some((self.name(), "number")),
        }
    }
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// `.name` or `["name"]`: a member of an object.
    Field(String),
    /// `[n]`: an element of a list.
    Index(u64),
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "map",
    }
}

fn write_literal(out: &mut String, value: &Value) {
    match value {
        Value::String(text) => write_string(out, text),
        Value::Array(elements) => {
            out.push('[');
            for (i, element) in elements.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_literal(out, element);
            }
            out.push(']');
        }
        // null, booleans and numbers print as JSON does, which the lexer reads back exactly
        // (floats in their shortest round-trip form, always with a '.' or an exponent).
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// A double-quoted string: `\\`, `\"` and control characters escaped, nothing else.
fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
