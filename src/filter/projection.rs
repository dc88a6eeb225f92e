//! Projection: which parts of a record's `value` a client receives. Paths are merged into a
//! tree once, at parse time (a path under another one it already has adds nothing), so that
//! applying it is one walk of the value and two projections that select the same parts share
//! one canonical form.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde_json::{Map, Value};

use crate::Limits;
use crate::ast::write_field;
use crate::error::FilterError;
use crate::parser::parse_paths;

/// The parts of `value` to keep, e.g. `id,total_cents,customer.name`.
#[derive(Debug, Clone)]
pub struct Projection {
    fields: Fields,
    canonical: String,
}

/// The members to keep of an object, each whole or in part.
type Fields = BTreeMap<String, Selection>;

#[derive(Debug, Clone)]
enum Selection {
    Whole,
    Part(Fields),
}

impl Projection {
    /// Parses comma-separated paths into `value`: names joined by `.`, or `["any name"]` for
    /// names that are not identifiers. At most [`Limits::max_fields`] paths of at most
    /// [`Limits::max_depth`] names, in at most [`Limits::max_length`] bytes.
    pub fn parse(source: &str, limits: &Limits) -> Result<Self, FilterError> {
        let mut fields = Fields::new();
        for path in parse_paths(source, limits)? {
            insert(&mut fields, path);
        }
        let mut canonical = String::new();
        write_fields(&mut canonical, &mut Vec::new(), &fields);
        Ok(Self { fields, canonical })
    }

    /// `value` with only the selected parts: objects along a path are rebuilt with just the
    /// selected members, a path that is missing (or runs into something other than an object)
    /// is left out, and an object left empty by that is left out too. A value that is not an
    /// object (text, a number, `null` for a tombstone) has no fields to select and is kept.
    pub fn apply(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(project(map, &self.fields)),
            other => other.clone(),
        }
    }

    /// The projection's normal form: its paths sorted, without duplicates or paths under
    /// another one, joined by `,`. Equal for projections that select the same parts.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

impl PartialEq for Projection {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for Projection {}

impl Hash for Projection {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}

fn insert(fields: &mut Fields, names: Vec<String>) {
    let mut names = names.into_iter().peekable();
    let mut fields = fields;
    while let Some(name) = names.next() {
        if names.peek().is_none() {
            fields.insert(name, Selection::Whole);
            return;
        }
        let selection = fields
            .entry(name)
            .or_insert_with(|| Selection::Part(Fields::new()));
        match selection {
            Selection::Whole => return,
            Selection::Part(inner) => fields = inner,
        }
    }
}

fn project(map: &Map<String, Value>, fields: &Fields) -> Map<String, Value> {
    let mut kept = Map::new();
    for (name, selection) in fields {
        match (map.get(name), selection) {
            (Some(value), Selection::Whole) => {
                kept.insert(name.clone(), value.clone());
            }
            (Some(Value::Object(inner)), Selection::Part(fields)) => {
                let inner = project(inner, fields);
                if !inner.is_empty() {
                    kept.insert(name.clone(), Value::Object(inner));
                }
            }
            _ => {}
        }
    }
    kept
}

/// Writes every path of `fields` under `prefix`, comma-separated.
fn write_fields<'f>(out: &mut String, prefix: &mut Vec<&'f str>, fields: &'f Fields) {
    for (name, selection) in fields {
        prefix.push(name);
        match selection {
            Selection::Whole => {
                if !out.is_empty() {
                    out.push(',');
                }
                for (i, name) in prefix.iter().enumerate() {
                    write_field(out, name, i == 0);
                }
            }
            Selection::Part(inner) => write_fields(out, prefix, inner),
        }
        prefix.pop();
    }
}
