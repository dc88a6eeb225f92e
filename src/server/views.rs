//! Views: what a connection sees of one endpoint's records besides their keys — a filter on
//! the envelope and a projection of its value, from the manifest, the token and the query
//! ANDed into one. Each distinct view is kept once per server ([`Views`]) and shared by the
//! connections that ask for it; the feed decides a record for a view once, whatever the
//! number of connections behind it, and serialises each distinct projection of it once
//! ([`Verdicts`]). Records that are not records (gaps, entries the bus could not read) reach
//! every view unchanged: they may hide a record that would have matched.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde_json::Value;

use crate::sse::RenderedEvent;
use fjord_bus::{BusEntry, EntryKind, StreamId};
use fjord_filter::{Filter, Projection, RecordView};

/// A filter and a projection for one endpoint of a connection; at least one of them.
#[derive(Debug)]
pub(crate) struct View {
    filter: Option<Filter>,
    projection: Option<Projection>,
}

/// A shared view's identity while a connection holds it: its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ViewId(usize);

impl ViewId {
    pub(crate) fn of(view: &Arc<View>) -> Self {
        Self(Arc::as_ptr(view) as usize)
    }
}

/// What a request asks to see of an endpoint, before [`Views::share`] finds it a shared
/// [`View`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ViewSpec {
    /// Only the records that pass.
    pub filter: Option<Filter>,
    /// Only these parts of each value.
    pub projection: Option<Projection>,
}

impl ViewSpec {
    /// Whether it sees every record whole, so that no view is needed.
    pub(crate) fn is_everything(&self) -> bool {
        self.filter.is_none() && self.projection.is_none()
    }

    /// The same, narrowed by `filter` too.
    #[must_use]
    pub(crate) fn and(self, filter: Option<Filter>) -> Self {
        Self {
            filter: Filter::all(self.filter.into_iter().chain(filter)),
            ..self
        }
    }

    /// The shared form's name: equal for views that see the same.
    fn canonical(&self) -> (String, String) {
        (
            self.filter
                .as_ref()
                .map(|filter| filter.canonical().to_owned())
                .unwrap_or_default(),
            self.projection
                .as_ref()
                .map(|projection| projection.canonical().to_owned())
                .unwrap_or_default(),
        )
    }
}

impl View {
    /// Whether the record of `envelope` passes the view's filter; one that is not a
    /// record's envelope passes nothing.
    fn admits(&self, envelope: &Value) -> bool {
        let Some(record) = RecordView::from_envelope(envelope) else {
            return false;
        };
        self.filter
            .as_ref()
            .is_none_or(|filter| filter.matches(&record))
    }

    /// What this view makes of a replayed entry of `endpoint`, whose whole event is
    /// `plain`: for one connection at a time, so the envelope is parsed here.
    pub(crate) fn see_replayed(
        &self,
        entry: &BusEntry,
        endpoint: &str,
        plain: RenderedEvent,
    ) -> Option<RenderedEvent> {
        let EntryKind::Record { envelope, .. } = &entry.kind else {
            return Some(plain);
        };
        let envelope: Value = serde_json::from_slice(envelope.as_bytes()).ok()?;
        if !self.admits(&envelope) {
            return None;
        }
        Some(match &self.projection {
            None => plain,
            Some(projection) => project(projection, &envelope, entry.id, endpoint),
        })
    }
}

/// The event of a record whose value is cut down to `projection`.
fn project(
    projection: &Projection,
    envelope: &Value,
    id: StreamId,
    endpoint: &str,
) -> RenderedEvent {
    // The envelope's other fields are copied; the value only in the parts kept.
    let projected: serde_json::Map<String, Value> = envelope
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, field)| {
            let field = if name == "value" {
                projection.apply(field)
            } else {
                field.clone()
            };
            (name.clone(), field)
        })
        .collect();
    // Serialising a `Value` cannot fail: every key is a string.
    let bytes = serde_json::to_vec(&projected).unwrap_or_default();
    RenderedEvent::new(id, endpoint, &bytes)
}

/// A server's distinct views, each kept while a connection holds it.
#[derive(Debug)]
pub(crate) struct Views {
    held: Mutex<HashMap<(String, String), Weak<View>>>,
    max_distinct: usize,
}

/// A new view was asked for while the server holds as many as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server holds as many distinct filters as it may ({max}, server.max_distinct_filters); retry later, on another server, or with a filter other streams use"
)]
pub struct TooManyViews {
    /// The limit.
    pub max: usize,
}

impl Views {
    /// No views yet; at most `max_distinct` at once.
    pub(crate) fn new(max_distinct: usize) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            max_distinct,
        }
    }

    /// The view that sees what `spec` asks for: the one another connection holds already,
    /// or a new one, within the limit. `None` for a spec that sees everything.
    pub(crate) fn share(&self, spec: ViewSpec) -> Result<Option<Arc<View>>, TooManyViews> {
        if spec.is_everything() {
            return Ok(None);
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let canonical = spec.canonical();
        if let Some(view) = held.get(&canonical).and_then(Weak::upgrade) {
            return Ok(Some(view));
        }
        if held.len() >= self.max_distinct {
            held.retain(|_, view| view.strong_count() > 0);
            if held.len() >= self.max_distinct {
                return Err(TooManyViews {
                    max: self.max_distinct,
                });
            }
        }
        let view = Arc::new(View {
            filter: spec.filter,
            projection: spec.projection,
        });
        held.insert(canonical, Arc::downgrade(&view));
        Ok(Some(view))
    }
}

/// One record's fate in every view that asks for it, decided once each: the feed's cache
/// while it dispatches the record. The envelope is parsed on the first view that needs it,
/// and each distinct projection serialised once.
pub(crate) struct Verdicts<'a, T> {
    entry: &'a BusEntry,
    endpoint: &'a str,
    /// Builds what is queued from a view's event.
    wrap: &'a dyn Fn(RenderedEvent) -> T,
    /// The parsed envelope: `None` until a view needs it, `Some(None)` if it is not JSON.
    envelope: Option<Option<Value>>,
    decided: HashMap<ViewId, Option<T>>,
    projected: HashMap<String, T>,
    evaluations: u64,
}

impl<'a, T: Clone> Verdicts<'a, T> {
    /// The verdicts on `entry` of `endpoint`; `wrap` makes a view's event into what the
    /// feed queues.
    pub(crate) fn new(
        entry: &'a BusEntry,
        endpoint: &'a str,
        wrap: &'a dyn Fn(RenderedEvent) -> T,
    ) -> Self {
        Self {
            entry,
            endpoint,
            wrap,
            envelope: None,
            decided: HashMap::new(),
            projected: HashMap::new(),
            evaluations: 0,
        }
    }

    /// How many views the record was decided for.
    pub(crate) fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// What `view` gets of the record, `None` for nothing; `whole` is what a connection
    /// that sees every record gets, for a view that changes nothing of this one.
    pub(crate) fn of(&mut self, view: &Arc<View>, whole: &T) -> Option<T> {
        let EntryKind::Record { envelope, .. } = &self.entry.kind else {
            return Some(whole.clone());
        };
        let decided = match self.decided.entry(ViewId::of(view)) {
            Entry::Occupied(decided) => return decided.get().clone(),
            Entry::Vacant(vacant) => vacant,
        };
        let envelope = self
            .envelope
            .get_or_insert_with(|| serde_json::from_slice(envelope.as_bytes()).ok());
        self.evaluations += 1;
        let event = envelope
            .as_ref()
            .filter(|envelope| view.admits(envelope))
            .map(|envelope| match &view.projection {
                None => whole.clone(),
                Some(projection) => {
                    if let Some(event) = self.projected.get(projection.canonical()) {
                        return event.clone();
                    }
                    let event =
                        (self.wrap)(project(projection, envelope, self.entry.id, self.endpoint));
                    self.projected
                        .insert(projection.canonical().to_owned(), event.clone());
                    event
                }
            });
        decided.insert(event.clone());
        event
    }
}
