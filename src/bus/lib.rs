//! `fjord-bus`: what the consumer and the server share, and none of the web stack (no warp,
//! hyper server or JWT; `ci/check-parts.sh`). The crate's root is the bus itself; beside it:
//! - [`envelope`]: a Kafka record as clients see it, encoded once.
//! - [`backoff`]: the delays between retries, doubling with jitter, for every retry loop.
//! - [`clock`]: wall-clock milliseconds and seconds, the one clock every part reads.
//! - [`process`]: logging, shutdown signals and the exit line, shared by every binary.
//!
//! The bus is the only link between consumers and servers. A consumer publishes each record
//! to the stream of every endpoint that carries its topic; every server instance reads all
//! of its endpoints' streams and can read back the retention window to resume a client.
//!
//! Two implementations behind one type: Redis Streams in production ([`redis`]) and an
//! in-process bus with the same semantics for `fjord dev` and unit tests ([`memory`]).
//! Publishing is idempotent per (endpoint, topic, partition, offset): a record consumed
//! twice after a crash or a rebalance is published once to each endpoint. Besides records, a stream carries markers for
//! records the consumer could not read and skipped ([`SkippedRecords`]), published the
//! same idempotent way, so that servers can tell every client of the endpoint. Every entry
//! read, by either bus, is decoded and checked once, in [`entry`], before a server sees it.
//! A table endpoint's bus also keeps the last record of each key as a row, updated in the
//! same step as its stream, which servers read in key order for a snapshot ([`Bus::rows`]).

pub mod backoff;
pub mod clock;
pub mod entry;
pub mod envelope;
pub mod memory;
pub mod process;
pub mod redis;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use crate::backoff::Backoff;
use crate::envelope::Envelope;
pub use entry::{InvalidEntry, Problem, WireJson};
use fjord_config::{EndpointName, Keeping};

/// A position in an endpoint's stream, `<milliseconds>-<sequence>` as Redis Streams number
/// entries. Ordered; the same entry has the same id on every server instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// Milliseconds since the epoch at which the bus took the entry.
    pub ms: u64,
    /// Sequence within that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// Before every entry.
    pub const ZERO: Self = Self { ms: 0, seq: 0 };
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A string that is not a stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stream id (<milliseconds>-<sequence>)")]
pub struct BadStreamId(pub String);

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadStreamId(text.chars().take(64).collect());
        let (ms, seq) = text.split_once('-').ok_or_else(bad)?;
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// What a stream entry holds, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A record.
    Record {
        /// The bytes of the record's key, which clients filter on; `None` for a record
        /// without a key.
        filter_key: Option<Bytes>,
        /// Its envelope, fit for the wire.
        envelope: WireJson,
    },
    /// A marker of records the consumer skipped.
    Skipped(Arc<SkippedRecords>),
    /// An entry Fjord did not write, or not so: it cannot be sent, only reported.
    Invalid(InvalidEntry),
}

/// Records of one partition that the consumer could not read at all (a corrupt or
/// undecodable batch), or read but could not decode by its topic's format, and skipped.
/// Their keys are unknown, so every client of the endpoints that carry the topic is told.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedRecords {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first offset skipped.
    pub first_offset: i64,
    /// The last offset skipped.
    pub last_offset: i64,
    /// Why the records could not be read, as the Kafka client (or the decoder) said.
    pub error: String,
    /// Which kind of skip; absent from an unreadable batch's marker, as before there were
    /// two kinds.
    #[serde(default, skip_serializing_if = "SkipReason::is_unreadable")]
    pub reason: SkipReason,
}

/// Why records were skipped: the `reason` of their `fjord.gap`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Kafka's client could not read the batch.
    #[default]
    UnreadableRecord,
    /// The record was read, but its key or value is not of its topic's format (or its
    /// schema could not be had from the registry).
    UndecodableRecord,
}

impl SkipReason {
    fn is_unreadable(&self) -> bool {
        *self == Self::UnreadableRecord
    }

    /// As in `fjord.gap`'s `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnreadableRecord => "unreadable_record",
            Self::UndecodableRecord => "undecodable_record",
        }
    }
}

/// One entry as read from an endpoint's stream (see [`entry::decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEntry {
    /// Its position in the endpoint's stream.
    pub id: StreamId,
    /// The position of the entry appended before it; a reader whose cursor is older has
    /// missed entries that retention trimmed. `ZERO` when an invalid entry does not say.
    pub previous: StreamId,
    /// What the entry holds.
    pub kind: EntryKind,
}

/// Which clients of an endpoint an entry concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receivers<'a> {
    /// Those that take every record, and those of this key (`None`: a record without one).
    Key(Option<&'a [u8]>),
    /// Every client of the endpoint, whatever its keys: what the entry held is unknown.
    All,
}

impl BusEntry {
    /// About how many bytes the entry holds, which bounds what a page of them costs.
    pub fn size(&self) -> usize {
        match &self.kind {
            EntryKind::Record { envelope, .. } => envelope.as_bytes().len(),
            EntryKind::Skipped(_) | EntryKind::Invalid(_) => size_of::<Self>(),
        }
    }

    /// The key the entry is about: a record's, or an invalid entry's that names one.
    pub fn filter_key(&self) -> Option<&Bytes> {
        match &self.kind {
            EntryKind::Record { filter_key, .. } => filter_key.as_ref(),
            EntryKind::Invalid(invalid) => invalid.filter_key.as_ref(),
            EntryKind::Skipped(_) => None,
        }
    }

    /// Which clients of its endpoint the entry concerns: a record's, or an invalid entry's
    /// that names a readable key, go by key; a marker of skipped records, or an invalid
    /// entry whose key is unknown, to everyone.
    pub fn receivers(&self) -> Receivers<'_> {
        match &self.kind {
            EntryKind::Record { filter_key, .. } => Receivers::Key(filter_key.as_deref()),
            EntryKind::Invalid(InvalidEntry {
                filter_key: Some(key),
                ..
            }) => Receivers::Key(Some(key)),
            EntryKind::Skipped(_) | EntryKind::Invalid(_) => Receivers::All,
        }
    }
}

/// Where one record goes: the endpoints that carry its topic, with their retention.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The endpoints to publish to, and what the bus keeps of each.
    pub endpoints: &'a [(EndpointName, Keeping)],
    /// The encoded record.
    pub envelope: &'a Envelope,
}

impl Publication<'_> {
    fn append(&self) -> Append<'_> {
        Append {
            topic: self.topic,
            partition: self.partition,
            endpoints: self.endpoints,
            entries: vec![AppendEntry::record(self.offset, self.envelope)],
        }
    }
}

/// Records of one partition, in offset order, and the endpoints that carry their topic:
/// what the consumer publishes in one round trip per endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The records' topic.
    pub topic: &'a str,
    /// Their partition.
    pub partition: i32,
    /// The endpoints to publish to, and what the bus keeps of each.
    pub endpoints: &'a [(EndpointName, Keeping)],
    /// The records, as (offset, encoded record), offsets rising.
    pub records: &'a [(i64, Envelope)],
}

/// Entries of one partition to append to the streams of `endpoints`, each once per
/// endpoint and offset: what both buses implement, for records and markers alike.
#[derive(Debug, Clone)]
struct Append<'a> {
    topic: &'a str,
    partition: i32,
    endpoints: &'a [(EndpointName, Keeping)],
    /// Offsets rising.
    entries: Vec<AppendEntry<'a>>,
}

/// One entry of an [`Append`].
#[derive(Debug, Clone, Copy)]
struct AppendEntry<'a> {
    /// The offset that counts as published afterwards: the record's, or a marker's last.
    offset: i64,
    kind: AppendKind,
    filter_key: Option<&'a [u8]>,
    body: &'a [u8],
}

impl<'a> AppendEntry<'a> {
    fn record(offset: i64, envelope: &'a Envelope) -> Self {
        Self {
            offset,
            kind: if envelope.tombstone {
                AppendKind::Tombstone
            } else {
                AppendKind::Record
            },
            filter_key: envelope.filter_key.as_deref(),
            body: &envelope.json,
        }
    }
}

/// What an [`AppendEntry`] appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendKind {
    /// A record's envelope.
    Record,
    /// A tombstone's envelope: a record whose key a table endpoint deletes.
    Tombstone,
    /// A [`SkippedRecords`] marker, as JSON.
    Skipped,
}

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The record was appended to its endpoints' streams.
    Appended,
    /// The record (or a later one of its partition) had been published before; nothing changed.
    Duplicate,
}

impl Published {
    /// What appending `appended` entries (over all endpoints) means.
    fn of(appended: usize) -> Self {
        if appended > 0 {
            Self::Appended
        } else {
            Self::Duplicate
        }
    }
}

/// A bus operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis could not be reached or refused the command. The client's error is part of
    /// the message, not a source, so that a log line says why and a chain says it once.
    #[error("redis {operation}: {error}")]
    Redis {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        error: ::redis::RedisError,
    },
    /// Redis answered with something Fjord did not write.
    #[error("redis {operation}: unexpected reply: {detail}")]
    Protocol {
        /// What was being done.
        operation: &'static str,
        /// What was unexpected.
        detail: String,
    },
    /// Redis refused how Fjord connects (credentials, TLS, URL); retrying cannot help.
    /// The client's error is part of the message, not a source, so that it reads as one line.
    #[error("redis at {url}: {problem} ({error})")]
    Refused {
        /// The manifest's `redis.url`, which carries no credentials.
        url: String,
        /// What failed, and which setting to look at.
        problem: String,
        /// The client's error.
        error: ::redis::RedisError,
    },
    /// Fewer replicas than `redis.commit_after_replicas` asks for acknowledged a publish in
    /// time; it is retried, and its offsets are not committed until then.
    #[error(
        "only {acknowledged} of the {wanted} Redis replicas that must hold a record before its offset is committed acknowledged it (redis.commit_after_replicas)"
    )]
    NotReplicated {
        /// How many did.
        acknowledged: u32,
        /// How many must.
        wanted: u32,
    },
    /// The manifest's secret for Redis is missing.
    #[error(transparent)]
    Config(#[from] fjord_config::ManifestError),
}

/// The bus, shared by clone.
#[derive(Debug, Clone)]
pub enum Bus {
    /// Redis Streams.
    Redis(Box<redis::RedisBus>),
    /// In process.
    Memory(memory::MemoryBus),
}

impl Bus {
    /// Publishes one record to its endpoints' streams, once per endpoint.
    pub async fn publish(&self, publication: Publication<'_>) -> Result<Published, BusError> {
        Ok(Published::of(self.append(&publication.append()).await?))
    }

    /// Publishes a batch of one partition's records, each once per endpoint: those an
    /// endpoint already holds (up to the offset it last took from the partition) are
    /// skipped there. Returns how many records were new, over all endpoints.
    pub async fn publish_batch(&self, batch: Batch<'_>) -> Result<usize, BusError> {
        self.append(&Append {
            topic: batch.topic,
            partition: batch.partition,
            endpoints: batch.endpoints,
            entries: batch
                .records
                .iter()
                .map(|(offset, envelope)| AppendEntry::record(*offset, envelope))
                .collect(),
        })
        .await
    }

    /// Publishes a marker for records the consumer skipped to the streams of `endpoints`,
    /// once: afterwards the partition counts as published up to the last skipped offset.
    pub async fn publish_skipped(
        &self,
        skipped: &SkippedRecords,
        endpoints: &[(EndpointName, Keeping)],
    ) -> Result<Published, BusError> {
        let body = serde_json::to_vec(skipped).map_err(|error| BusError::Protocol {
            operation: "encode skipped records",
            detail: error.to_string(),
        })?;
        let appended = self
            .append(&Append {
                topic: &skipped.topic,
                partition: skipped.partition,
                endpoints,
                entries: vec![AppendEntry {
                    offset: skipped.last_offset,
                    kind: AppendKind::Skipped,
                    filter_key: None,
                    body: &body,
                }],
            })
            .await?;
        Ok(Published::of(appended))
    }

    async fn append(&self, append: &Append<'_>) -> Result<usize, BusError> {
        match self {
            Self::Redis(bus) => bus.append(append).await,
            Self::Memory(bus) => Ok(bus.append(append)),
        }
    }

    /// A reader of `endpoints` that starts after each stream's current last entry.
    pub async fn reader(&self, endpoints: Vec<EndpointName>) -> Result<BusReader, BusError> {
        Ok(match self {
            Self::Redis(bus) => BusReader::Redis(Box::new(bus.reader(endpoints).await?)),
            Self::Memory(bus) => BusReader::Memory(bus.reader(endpoints)),
        })
    }

    /// Up to `count` entries of `endpoint` after `after` (exclusive) up to `until`
    /// (inclusive), in order.
    pub async fn range(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
        until: StreamId,
        count: usize,
    ) -> Result<Vec<BusEntry>, BusError> {
        match self {
            Self::Redis(bus) => bus.range(endpoint, after, until, count).await,
            Self::Memory(bus) => Ok(bus.range(endpoint, after, until, count)),
        }
    }

    /// Whether retention trimmed entries of `endpoint` that came after `after`; if so, the
    /// id of the oldest entry still kept (`ZERO` when none is).
    pub async fn trimmed_after(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
    ) -> Result<Option<StreamId>, BusError> {
        match self {
            Self::Redis(bus) => bus.trimmed_after(endpoint, after).await,
            Self::Memory(bus) => Ok(bus.trimmed_after(endpoint, after)),
        }
    }

    /// Up to `count` rows of table endpoint `endpoint` whose key comes after `after` in
    /// bytewise order (`None`: from the first), in that order, each as the stream entry of
    /// the record it holds. Paging this way never repeats a row, and never misses one that
    /// was there all along; a row changed or added meanwhile may or may not be included,
    /// and its record is in the stream after where the snapshot began.
    pub async fn rows(
        &self,
        endpoint: &EndpointName,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<Vec<BusEntry>, BusError> {
        match self {
            Self::Redis(bus) => bus.rows(endpoint, after, count).await,
            Self::Memory(bus) => Ok(bus.rows(endpoint, after, count)),
        }
    }

    /// Checks that the bus answers.
    pub async fn ping(&self) -> Result<(), BusError> {
        match self {
            Self::Redis(bus) => bus.ping().await,
            Self::Memory(_) => Ok(()),
        }
    }
}

/// Connects to Redis, retrying with backoff while it cannot be reached; fails at once on
/// what retrying cannot mend: a missing password variable, credentials Redis refuses, a
/// certificate that is not trusted, a port that does not speak TLS.
pub async fn connect_redis(config: &fjord_config::RedisConfig) -> Result<Bus, BusError> {
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        match redis::RedisBus::connect(config).await {
            Ok(bus) => return Ok(Bus::Redis(Box::new(bus))),
            Err(error @ (BusError::Config(_) | BusError::Refused { .. })) => return Err(error),
            Err(error) => {
                // A TLS port resets a connection that does not start with a TLS greeting;
                // that may also pass, so it is a hint rather than a reason to stop.
                let hint = match &error {
                    BusError::Redis { error, .. }
                        if config.url.starts_with("redis://")
                            && error.is_connection_dropped()
                            && !error.is_connection_refusal() =>
                    {
                        " (if this port serves TLS, the URL needs rediss://)"
                    }
                    _ => "",
                };
                let retry_in = backoff.next_delay();
                tracing::warn!(%error, url = %config.url, ?retry_in, "redis is not reachable yet{hint}");
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// Reads the streams of a fixed list of endpoints, in order, from where it last stopped.
#[derive(Debug)]
pub enum BusReader {
    /// Redis Streams.
    Redis(Box<redis::RedisReader>),
    /// In process.
    Memory(memory::MemoryReader),
}

impl BusReader {
    /// The next entries of any endpoint, as (index into the reader's endpoints, entry),
    /// in stream order per endpoint. Waits up to about a second; empty when nothing came.
    pub async fn next_batch(&mut self) -> Result<Vec<(usize, BusEntry)>, BusError> {
        match self {
            Self::Redis(reader) => reader.next_batch().await,
            Self::Memory(reader) => Ok(reader.next_batch().await),
        }
    }

    /// The id of the last entry read, per endpoint.
    pub fn cursors(&self) -> &[StreamId] {
        match self {
            Self::Redis(reader) => &reader.cursors,
            Self::Memory(reader) => &reader.cursors,
        }
    }
}

/// Most entries one read returns per endpoint.
const READ_BATCH: usize = 512;

/// A table's row as a stream entry: the record of `key` held at `id`, checked as every
/// entry read is.
fn row_entry(id: StreamId, key: Bytes, envelope: Bytes) -> BusEntry {
    entry::decode(
        id,
        [
            (Bytes::from_static(entry::field::ENVELOPE), envelope),
            (Bytes::from_static(entry::field::KEY), key),
            (
                Bytes::from_static(entry::field::PREVIOUS),
                Bytes::from_static(b"0-0"),
            ),
        ],
    )
}

/// Rows a table endpoint did not keep because it was full, logged at most once every ten
/// seconds.
fn report_table_full(endpoint: &EndpointName, refused: usize) {
    static FULL: process::LogThrottle =
        process::LogThrottle::new(std::time::Duration::from_secs(10));
    if refused > 0
        && let Some(held_back) = FULL.admit()
    {
        tracing::warn!(
            endpoint = endpoint.as_str(),
            refused,
            held_back,
            "a table endpoint is full (table.max_keys or table.max_bytes): records of new keys stream but are not kept as rows"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip_and_order() {
        let id: StreamId = "1764000000000-7".parse().expect("valid");
        assert_eq!(
            id,
            StreamId {
                ms: 1_764_000_000_000,
                seq: 7
            }
        );
        assert_eq!(id.to_string(), "1764000000000-7");
        assert!(StreamId { ms: 1, seq: 9 } < StreamId { ms: 2, seq: 0 });
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "a-1",
            "1-1-1",
            "+1-1",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }
}
