//! Evaluation: a compiled filter against one record, without allocating. Every operand
//! borrows from the record or the filter; a missing field or an operator applied to the
//! wrong types is *undefined* (CEL's error), which `&&` and `||` absorb as CEL does and which
//! makes the whole filter not match.

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::RecordView;
use crate::ast::{Expr, Path, Relation, Root, Step, TextTest};

/// What the record lacks, for its `key` when it has none.
static NULL: Value = Value::Null;

/// Whether `expr` is true for `record`; undefined is not true.
pub(crate) fn matches(expr: &Expr, record: &RecordView<'_>) -> bool {
    truth(expr, record) == Some(true)
}

/// An operand during evaluation.
#[derive(Debug, Clone, Copy)]
enum Operand<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Text(&'a str),
    List(&'a [Value]),
    Map(&'a Map<String, Value>),
}

/// A number of either kind; `i128` holds every JSON integer serde_json keeps (i64 and u64).
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl<'a> From<&'a Value> for Operand<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(value) => Self::Bool(*value),
            Value::Number(number) => {
                Self::Number(match (number.as_i64(), number.as_u64(), number.as_f64()) {
                    (Some(int), ..) => Number::Int(i128::from(int)),
                    (None, Some(int), _) => Number::Int(i128::from(int)),
                    (None, None, float) => Number::Float(float.unwrap_or(f64::NAN)),
                })
            }
            Value::String(text) => Self::Text(text),
            Value::Array(list) => Self::List(list),
            Value::Object(map) => Self::Map(map),
        }
    }
}

/// Three-valued logic: `None` is undefined.
fn truth(expr: &Expr, record: &RecordView<'_>) -> Option<bool> {
    match expr {
        Expr::And(operands) => {
            let mut undefined = false;
            for operand in operands {
                match truth(operand, record) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => undefined = true,
                }
            }
            (!undefined).then_some(true)
        }
        Expr::Or(operands) => {
            let mut undefined = false;
            for operand in operands {
                match truth(operand, record) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => undefined = true,
                }
            }
            (!undefined).then_some(false)
        }
        Expr::Not(operand) => truth(operand, record).map(|value| !value),
        other => match evaluate(other, record)? {
            Operand::Bool(value) => Some(value),
            _ => None,
        },
    }
}

fn evaluate<'a>(expr: &'a Expr, record: &RecordView<'a>) -> Option<Operand<'a>> {
    let operand = match expr {
        Expr::Literal(value) => Operand::from(value),
        Expr::Path(path) => resolve(path, record)?,
        Expr::And(_) | Expr::Or(_) | Expr::Not(_) => Operand::Bool(truth(expr, record)?),
        Expr::Relation(relation, left, right) => {
            let left = evaluate(left, record)?;
            let right = evaluate(right, record)?;
            Operand::Bool(match relation {
                Relation::Eq => equal(left, right),
                Relation::Ne => !equal(left, right),
                Relation::Lt => order(left, right)?.is_lt(),
                Relation::Le => order(left, right)?.is_le(),
                Relation::Gt => order(left, right)?.is_gt(),
                Relation::Ge => order(left, right)?.is_ge(),
                Relation::In => contains(right, left)?,
            })
        }
        Expr::Has(path) => Operand::Bool(resolve(path, record).is_some()),
        Expr::Size(operand) => {
            let size = match evaluate(operand, record)? {
                Operand::Text(text) => text.chars().count(),
                Operand::List(list) => list.len(),
                Operand::Map(map) => map.len(),
                _ => return None,
            };
            Operand::Number(Number::Int(i128::try_from(size).ok()?))
        }
        Expr::Text(test, receiver, argument) => {
            let (Operand::Text(receiver), Operand::Text(argument)) =
                (evaluate(receiver, record)?, evaluate(argument, record)?)
            else {
                return None;
            };
            Operand::Bool(match test {
                TextTest::StartsWith => receiver.starts_with(argument),
                TextTest::EndsWith => receiver.ends_with(argument),
                TextTest::Contains => receiver.contains(argument),
            })
        }
    };
    Some(operand)
}

/// Where `path` leads in `record`, if anywhere.
fn resolve<'a>(path: &'a Path, record: &RecordView<'a>) -> Option<Operand<'a>> {
    let mut steps = path.steps.iter();
    let mut at = match path.root {
        Root::Value => record.value,
        Root::Key => record.key.unwrap_or(&NULL),
        Root::Headers => match steps.next() {
            None => return Some(Operand::Map(record.headers)),
            Some(Step::Field(name)) => record.headers.get(name)?,
            Some(Step::Index(_)) => return None,
        },
        Root::Topic => return Some(Operand::Text(record.topic)),
        Root::Partition => return Some(Operand::Number(Number::Int(record.partition.into()))),
        Root::Offset => return Some(Operand::Number(Number::Int(record.offset.into()))),
        Root::Timestamp => {
            return Some(record.timestamp.map_or(Operand::Null, |timestamp| {
                Operand::Number(Number::Int(timestamp.into()))
            }));
        }
    };
    for step in steps {
        at = match (step, at) {
            (Step::Field(name), Value::Object(map)) => map.get(name)?,
            (Step::Index(index), Value::Array(list)) => list.get(usize::try_from(*index).ok()?)?,
            _ => return None,
        };
    }
    Some(Operand::from(at))
}

/// `element in collection`: an element of a list, a member's name of an object.
fn contains(collection: Operand<'_>, element: Operand<'_>) -> Option<bool> {
    match collection {
        Operand::List(list) => Some(list.iter().any(|item| equal(element, item.into()))),
        Operand::Map(map) => Some(match element {
            Operand::Text(name) => map.contains_key(name),
            _ => false,
        }),
        _ => None,
    }
}

/// CEL's equality: values of different types are unequal (not an error), numbers compare by
/// value whatever their kind, lists and maps element by element.
fn equal(left: Operand<'_>, right: Operand<'_>) -> bool {
    match (left, right) {
        (Operand::Null, Operand::Null) => true,
        (Operand::Bool(left), Operand::Bool(right)) => left == right,
        (Operand::Number(left), Operand::Number(right)) => {
            compare_numbers(left, right) == Some(Ordering::Equal)
        }
        (Operand::Text(left), Operand::Text(right)) => left == right,
        (Operand::List(left), Operand::List(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .zip(right)
                    .all(|(left, right)| equal(left.into(), right.into()))
        }
        (Operand::Map(left), Operand::Map(right)) => {
            left.len() == right.len()
                && left.iter().all(|(name, left)| {
                    right
                        .get(name)
                        .is_some_and(|right| equal(left.into(), right.into()))
                })
        }
        _ => false,
    }
}

/// CEL's ordering: numbers with numbers, strings with strings (by code point), booleans
/// with booleans; anything else is undefined.
fn order(left: Operand<'_>, right: Operand<'_>) -> Option<Ordering> {
    match (left, right) {
        (Operand::Number(left), Operand::Number(right)) => compare_numbers(left, right),
        (Operand::Text(left), Operand::Text(right)) => Some(left.cmp(right)),
        (Operand::Bool(left), Operand::Bool(right)) => Some(left.cmp(&right)),
        _ => None,
    }
}

/// Compares exactly, also an integer beyond 2^53 with a float.
fn compare_numbers(left: Number, right: Number) -> Option<Ordering> {
    match (left, right) {
        (Number::Int(left), Number::Int(right)) => Some(left.cmp(&right)),
        (Number::Float(left), Number::Float(right)) => left.partial_cmp(&right),
        (Number::Int(left), Number::Float(right)) => int_to_float(left, right),
        (Number::Float(left), Number::Int(right)) => {
            int_to_float(right, left).map(Ordering::reverse)
        }
    }
}

fn int_to_float(int: i128, float: f64) -> Option<Ordering> {
    // An integral float well within i128 converts exactly. Any other float is either beyond
    // every JSON integer or below 2^52 in magnitude with a fraction, and rounding the integer
    // to f64 (monotonic, onto integral values) then keeps the order strict and exact.
    if float.fract() == 0.0 && float.abs() < 2f64.powi(100) {
        Some(int.cmp(&(float as i128)))
    } else {
        (int as f64).partial_cmp(&float)
    }
}
