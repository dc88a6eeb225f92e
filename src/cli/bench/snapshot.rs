//! Reading a table endpoint's snapshot as a client does, in the load generator's workers:
//! per connection, the SSE lines after the prelude — `fjord.snapshot_start`, one row per
//! key (no `id:`), `fjord.snapshot_end`, then live records — with the time from the
//! connection's start to its first row and to the snapshot's end, the rows counted and
//! their keys checked to rise, and the map the client would hold at the end: every key it
//! has, folded into an order-free digest of (key, sequence number) that the controller
//! compares with what it published. The table scenario's records are driver positions
//! keyed `driver-NNNNNN` (the key's number is its index), whose value starts with `seq`,
//! the record's number, and for an update `prev`, the number of the record it replaces, so
//! that a live record takes its predecessor out of the digest without a map of values.
//! A connection the server closes after its snapshot resumes from the last id it read, as
//! a client does, and keeps its map; a later snapshot replaces the map.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// What a worker's connections to a table endpoint expect.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TableSpec {
    /// The keys in the table: `driver-000000` up to this, exclusive.
    pub keys: u64,
}

/// The key of row `index`; zero-padded, so that key order is index order.
pub(super) fn key_of(index: u64) -> String {
    format!("driver-{index:06}")
}

/// What a key and a record's number add to a map's digest (a SplitMix64 finalizer, so that
/// a sum of them tells maps apart).
pub(super) fn mix(key: u64, seq: u64) -> u64 {
    let mut z = key
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seq)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One final map and how many connections ended with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCount {
    /// Keys the map holds.
    pub held: u64,
    /// The sum of [`mix`] over them.
    pub digest: u64,
    /// Connections that hold it.
    pub connections: u64,
}

/// What a worker's connections read of the snapshot and the records after it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Connections whose snapshot ended (`fjord.snapshot_end`).
    pub complete: u64,
    /// Connections that failed or closed before it.
    pub incomplete: u64,
    /// Rows received in snapshots, over all connections.
    pub rows: u64,
    /// Complete snapshots that had not one row per key of the table.
    pub short: u64,
    /// Rows whose key did not come after the previous row's (repeated or out of order).
    pub unordered: u64,
    /// Events where none was due: a row outside a snapshot, a record before it, a second
    /// snapshot, a notice such as `fjord.gap`, a row or record that names no known key.
    pub unexpected: u64,
    /// From a connection's start to its first row, in microseconds.
    pub first_row: Histogram,
    /// From a connection's start to its `fjord.snapshot_end`, in microseconds.
    pub end: Histogram,
    /// Live records received after the snapshots.
    pub live: u64,
    /// Reconnections with `Last-Event-ID` after the server closed a connection whose
    /// snapshot had ended.
    #[serde(default)]
    pub resumed: u64,
    /// Snapshots after a connection's first (the server sent a new one on a resume).
    #[serde(default)]
    pub resnapshots: u64,
    /// From the worker's start to its last `fjord.snapshot_end`, in seconds.
    pub burst_secs: f64,
    /// The maps the connections hold at the end.
    pub maps: Vec<MapCount>,
}

impl SnapshotReport {
    /// Counts `view`'s checks and its final map in.
    pub(super) fn add(&mut self, view: &TableView) {
        self.unordered += view.unordered;
        self.unexpected += view.unexpected;
        self.live += view.live;
        self.resnapshots += view.snapshots.saturating_sub(1);
        if view.phase != Phase::Live {
            return;
        }
        match self
            .maps
            .iter_mut()
            .find(|map| map.held == view.held && map.digest == view.digest)
        {
            Some(map) => map.connections += 1,
            None => self.maps.push(MapCount {
                held: view.held,
                digest: view.digest,
                connections: 1,
            }),
        }
    }

    /// Adds another worker's report.
    pub(super) fn merge(&mut self, other: &Self) {
        self.complete += other.complete;
        self.incomplete += other.incomplete;
        self.rows += other.rows;
        self.short += other.short;
        self.unordered += other.unordered;
        self.unexpected += other.unexpected;
        self.first_row.merge(&other.first_row);
        self.end.merge(&other.end);
        self.live += other.live;
        self.resumed += other.resumed;
        self.resnapshots += other.resnapshots;
        self.burst_secs = self.burst_secs.max(other.burst_secs);
        for theirs in &other.maps {
            match self
                .maps
                .iter_mut()
                .find(|map| map.held == theirs.held && map.digest == theirs.digest)
            {
                Some(map) => map.connections += theirs.connections,
                None => self.maps.push(*theirs),
            }
        }
    }
}

/// Where a connection is in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Before `fjord.snapshot_start`.
    Before,
    /// Reading rows.
    Rows,
    /// After `fjord.snapshot_end`.
    Live,
}

/// The name of the event whose lines are being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// No `event:` line yet.
    None,
    Start,
    End,
    /// Another reserved event, such as `fjord.gap`.
    Notice,
    /// The endpoint's: a row or a record.
    Record,
}

/// What a line meant to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Nothing to count beyond the view.
    Nothing,
    /// The snapshot ended: its rows, and since the connection's start, its first row and
    /// its end.
    Ended {
        rows: u64,
        first_row: Duration,
        end: Duration,
    },
    /// A live record published at this time (microseconds since the epoch).
    Live { published_us: u64 },
}

/// One connection's reading of a table endpoint.
#[derive(Debug)]
pub(super) struct TableView {
    keys: u64,
    started: Instant,
    phase: Phase,
    event: Event,
    first_row: Option<Duration>,
    rows: u64,
    last_key: Option<u64>,
    /// Which keys the client holds, a bit per key.
    present: Vec<u64>,
    held: u64,
    digest: u64,
    unordered: u64,
    unexpected: u64,
    live: u64,
    /// Snapshots started.
    snapshots: u64,
    /// The highest record number of the live records.
    max_seq: Option<u64>,
    /// The last `id:` read: where to resume from.
    last_id: Option<String>,
}

impl TableView {
    pub(super) fn new(keys: u64) -> Self {
        Self {
            keys,
            started: Instant::now(),
            phase: Phase::Before,
            event: Event::None,
            first_row: None,
            rows: 0,
            last_key: None,
            present: vec![0; usize::try_from(keys.div_ceil(64)).unwrap_or(0)],
            held: 0,
            digest: 0,
            unordered: 0,
            unexpected: 0,
            live: 0,
            snapshots: 0,
            max_seq: None,
            last_id: None,
        }
    }

    /// The connection was opened again: its stream starts over with a prelude.
    pub(super) fn reopened(&mut self) {
        self.event = Event::None;
    }

    /// Where a new connection resumes from.
    pub(super) fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The highest record number of the live records received.
    pub(super) fn max_seq(&self) -> Option<u64> {
        self.max_seq
    }

    /// The connection starts now: times are from here.
    pub(super) fn start(&mut self) {
        self.started = Instant::now();
    }

    /// The keys in the table.
    pub(super) fn keys(&self) -> u64 {
        self.keys
    }

    /// Whether `fjord.snapshot_end` arrived.
    pub(super) fn ended(&self) -> bool {
        self.phase == Phase::Live
    }

    /// Reads one SSE line (without its line feed).
    pub(super) fn line(&mut self, line: &[u8]) -> Seen {
        if line.is_empty() {
            self.event = Event::None;
            return Seen::Nothing;
        }
        if let Some(name) = line.strip_prefix(b"event: ") {
            self.event = match name {
                b"fjord.snapshot_start" => Event::Start,
                b"fjord.snapshot_end" => Event::End,
                _ if name.starts_with(b"fjord.") => Event::Notice,
                _ => Event::Record,
            };
            return Seen::Nothing;
        }
        if let Some(id) = line.strip_prefix(b"id: ") {
            self.last_id = Some(String::from_utf8_lossy(id).into_owned());
            return Seen::Nothing;
        }
        if !line.starts_with(b"data: ") {
            // `retry:`, a heartbeat's comment.
            return Seen::Nothing;
        }
        match (self.event, self.phase) {
            (Event::Start, Phase::Before) => {
                self.phase = Phase::Rows;
                self.snapshots = 1;
                Seen::Nothing
            }
            // A new snapshot on a resume: it replaces the map.
            (Event::Start, Phase::Live) => {
                self.phase = Phase::Rows;
                self.snapshots += 1;
                self.present.fill(0);
                self.held = 0;
                self.digest = 0;
                self.last_key = None;
                Seen::Nothing
            }
            (Event::End, Phase::Rows) => {
                self.phase = Phase::Live;
                if self.snapshots > 1 {
                    return Seen::Nothing;
                }
                let end = self.started.elapsed();
                Seen::Ended {
                    rows: self.rows,
                    first_row: self.first_row.unwrap_or(end),
                    end,
                }
            }
            (Event::Record, Phase::Rows) => {
                self.row(line);
                Seen::Nothing
            }
            (Event::Record, Phase::Live) => self.record(line),
            _ => {
                self.unexpected += 1;
                Seen::Nothing
            }
        }
    }

    fn row(&mut self, line: &[u8]) {
        if self.snapshots == 1 {
            self.rows += 1;
        }
        if self.first_row.is_none() {
            self.first_row = Some(self.started.elapsed());
        }
        let Some((key, seq, _, _)) = self.fields(line) else {
            self.unexpected += 1;
            return;
        };
        if self.last_key.is_some_and(|last| key <= last) {
            self.unordered += 1;
        }
        self.last_key = Some(key);
        if self.hold(key) {
            self.digest = self.digest.wrapping_add(mix(key, seq));
        }
    }

    fn record(&mut self, line: &[u8]) -> Seen {
        self.live += 1;
        let Some((key, seq, prev, published_us)) = self.fields(line) else {
            self.unexpected += 1;
            return Seen::Nothing;
        };
        if !self.hold(key) {
            // The record replaces a row the client has: take that row's out.
            match prev {
                Some(prev) => self.digest = self.digest.wrapping_sub(mix(key, prev)),
                None => self.unexpected += 1,
            }
        }
        self.digest = self.digest.wrapping_add(mix(key, seq));
        self.max_seq = Some(self.max_seq.map_or(seq, |max| max.max(seq)));
        Seen::Live { published_us }
    }

    /// Marks `key` held; whether it was new.
    fn hold(&mut self, key: u64) -> bool {
        let (word, bit) = ((key / 64) as usize, 1_u64 << (key % 64));
        let new = self.present[word] & bit == 0;
        if new {
            self.present[word] |= bit;
            self.held += 1;
        }
        new
    }

    /// The key's index, `seq`, `prev` and `ts` of a row's or record's data line, read in
    /// one pass from left to right (the envelope's key comes before its value, whose fields
    /// start with these).
    fn fields(&self, line: &[u8]) -> Option<(u64, u64, Option<u64>, u64)> {
        let (key, at) = number_after(line, 0, b"\"key\":\"driver-")?;
        if key >= self.keys {
            return None;
        }
        let (seq, at) = number_after(line, at, b"\"seq\":")?;
        let (prev, at) = match number_after(line, at, b"\"prev\":") {
            Some((prev, after)) => (Some(prev), after),
            None => (None, at),
        };
        let (published_us, _) = number_after(line, at, b"\"ts\":")?;
        Some((key, seq, prev, published_us))
    }
}

/// The number right after the first `name` at or after `from` in `line`, and where it ends.
pub(super) fn number_after(line: &[u8], from: usize, name: &[u8]) -> Option<(u64, usize)> {
    let (&first, rest) = name.split_first()?;
    let mut at = from;
    let start = loop {
        let offset = line.get(at..)?.iter().position(|&byte| byte == first)?;
        let candidate = at + offset;
        if line.get(candidate + 1..candidate + name.len()) == Some(rest) {
            break candidate + name.len();
        }
        at = candidate + 1;
    };
    let digits = line[start..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    let number = std::str::from_utf8(&line[start..start + digits])
        .ok()?
        .parse()
        .ok()?;
    Some((number, start + digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: u64, seq: u64, prev: Option<u64>) -> String {
        let prev = prev.map_or_else(String::new, |prev| format!(r#""prev":{prev},"#));
        format!(
            r#"data: {{"topic":"drivers","partition":0,"offset":{seq},"key":"{}","timestamp":1,"headers":{{}},"value":{{"seq":{seq},{prev}"ts":1700000000000000,"lat":59.9}}}}"#,
            key_of(key)
        )
    }

    fn feed(view: &mut TableView, text: &str) -> Vec<Seen> {
        text.lines()
            .map(|line| view.line(line.as_bytes()))
            .filter(|seen| *seen != Seen::Nothing)
            .collect()
    }

    fn snapshot(rows: &[(u64, u64)]) -> String {
        let mut text = String::from(
            "retry: 1000\nid: 0-0\n\nevent: fjord.snapshot_start\ndata: {\"endpoint\":\"drivers\"}\n\n",
        );
        for &(key, seq) in rows {
            text.push_str(&format!("event: drivers\n{}\n\n", data(key, seq, None)));
        }
        text.push_str("id: 5-0\nevent: fjord.snapshot_end\ndata: {\"endpoint\":\"drivers\"}\n\n");
        text
    }

    fn digest(map: &[(u64, u64)]) -> u64 {
        map.iter()
            .fold(0_u64, |sum, &(key, seq)| sum.wrapping_add(mix(key, seq)))
    }

    #[test]
    fn a_snapshot_counts_its_rows_and_ends_once() {
        let mut view = TableView::new(3);
        let seen = feed(&mut view, &snapshot(&[(0, 0), (1, 1), (2, 2)]));
        let [
            Seen::Ended {
                rows,
                first_row,
                end,
            },
        ] = seen.as_slice()
        else {
            panic!("{seen:?}");
        };
        assert_eq!(*rows, 3);
        assert!(first_row <= end);
        assert!(view.ended());
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.unordered + report.unexpected, 0);
        assert_eq!(
            report.maps,
            [MapCount {
                held: 3,
                digest: digest(&[(0, 0), (1, 1), (2, 2)]),
                connections: 1
            }]
        );
    }

    #[test]
    fn live_records_replace_their_predecessor_in_the_map() {
        let mut view = TableView::new(3);
        let mut text = snapshot(&[(0, 0), (2, 2)]);
        // Key 1 changed while the snapshot was read: it comes with the live records.
        text.push_str(&format!(
            "id: 6-0\nevent: drivers\n{}\n\n",
            data(1, 3, Some(1))
        ));
        text.push_str(": heartbeat\n\n");
        text.push_str(&format!(
            "id: 7-0\nevent: drivers\n{}\n\n",
            data(2, 4, Some(2))
        ));
        let seen = feed(&mut view, &text);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(
            seen[1],
            Seen::Live {
                published_us: 1_700_000_000_000_000
            }
        );
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.live, 2);
        assert_eq!(report.unexpected, 0);
        assert_eq!(report.maps[0].held, 3);
        assert_eq!(report.maps[0].digest, digest(&[(0, 0), (1, 3), (2, 4)]));
    }

    #[test]
    fn disorder_repeats_and_stray_events_are_counted() {
        let mut view = TableView::new(3);
        // A row before the snapshot, then rows out of order and repeated, a gap notice.
        let mut text = format!("event: drivers\n{}\n\n", data(0, 0, None));
        text.push_str(&snapshot(&[(1, 1), (0, 0), (0, 0)]));
        text.push_str("event: fjord.gap\ndata: {}\n\n");
        text.push_str(&format!("event: drivers\n{}\n\n", data(7, 9, None)));
        feed(&mut view, &text);
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.unordered, 2);
        // The early row, the notice, and a key the table lacks.
        assert_eq!(report.unexpected, 3);
        assert_eq!(report.maps[0].held, 2);
    }

    #[test]
    fn reports_merge_their_maps() {
        let map = |held, connections| MapCount {
            held,
            digest: 7,
            connections,
        };
        let mut a = SnapshotReport {
            maps: vec![map(3, 2)],
            burst_secs: 1.0,
            ..SnapshotReport::default()
        };
        let b = SnapshotReport {
            maps: vec![map(3, 5), map(2, 1)],
            burst_secs: 2.0,
            ..SnapshotReport::default()
        };
        a.merge(&b);
        assert_eq!(a.maps, [map(3, 7), map(2, 1)]);
        assert!((a.burst_secs - 2.0).abs() < f64::EPSILON);
    }

    #[test]
    fn numbers_are_read_left_to_right() {
        let line = br#"{"key":"driver-000042","value":{"seq":9,"ts":12}} "seq":x"#;
        let (key, at) = number_after(line, 0, b"\"key\":\"driver-").expect("key");
        assert_eq!(key, 42);
        let (seq, at) = number_after(line, at, b"\"seq\":").expect("seq");
        assert_eq!(seq, 9);
        assert_eq!(number_after(line, at, b"\"prev\":"), None);
        assert_eq!(
            number_after(line, at, b"\"ts\":").map(|(ts, _)| ts),
            Some(12)
        );
        // A name followed by no number.
        assert_eq!(number_after(line, at + 5, b"\"seq\":"), None);
    }

    #[test]
    fn a_resume_keeps_the_map_and_a_new_snapshot_replaces_it() {
        let mut view = TableView::new(2);
        let mut text = snapshot(&[(0, 0), (1, 1)]);
        text.push_str(&format!(
            "id: 6-0\nevent: drivers\n{}\n\n",
            data(1, 2, Some(1))
        ));
        feed(&mut view, &text);
        assert_eq!(view.last_id(), Some("6-0"));
        assert_eq!(view.max_seq(), Some(2));
        // The server closes the connection; it resumes from 6-0.
        view.reopened();
        let mut resumed = String::from("retry: 1000\nid: 6-0\n\n");
        resumed.push_str(&format!(
            "id: 7-0\nevent: drivers\n{}\n\n",
            data(0, 3, Some(0))
        ));
        assert_eq!(feed(&mut view, &resumed).len(), 1);
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.maps[0].digest, digest(&[(0, 3), (1, 2)]));
        // A new snapshot replaces the map, and is not timed again.
        view.reopened();
        let seen = feed(&mut view, &snapshot(&[(0, 3), (1, 4)]));
        assert!(seen.is_empty(), "{seen:?}");
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.resnapshots, 1);
        assert_eq!((report.unordered, report.unexpected), (0, 0));
        assert_eq!(report.maps[0].held, 2);
        assert_eq!(report.maps[0].digest, digest(&[(0, 3), (1, 4)]));
    }
}
