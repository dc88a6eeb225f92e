//! A consumer-group member: reads its share of the group's partitions, encodes each record
//! once into an envelope, publishes it to the bus, and only then stores its offset for the
//! next commit — so a record is committed only after the bus holds it (at-least-once), and
//! the bus's idempotent publish turns a second delivery after a crash into a no-op.
//!
//! Each partition has one batch in flight at a time; the records read meanwhile make its
//! next batch, so a Redis round trip carries as many records as arrived during the last
//! one, in offset order, and offsets are stored in that order as batches land.
//!
//! While the bus is unreachable the member stops reading once 8,192 records wait
//! (backpressure) and retries the same batch; it never skips a record it can read.
//!
//! A batch that cannot be read at all (a corrupt compressed payload, an unknown codec) would
//! stop its partition for good: librdkafka reports an error without saying where and fetches
//! the same batch again, forever. The member finds the partition and the offsets the batch
//! covers with a probe of its own, publishes a marker of the skipped records to the bus
//! (clients get `fjord.gap`), and seeks past them.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::bus::{Batch, Bus, BusError, SkippedRecords};
use crate::config::{
    ConsumerGroupConfig, EndpointName, KafkaConfig, KafkaSecurity, Manifest, ManifestError,
    OffsetReset, Retention,
};
use crate::envelope::{Envelope, RecordParts};

/// Why a consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The manifest's Kafka settings could not be applied.
    #[error(transparent)]
    Config(#[from] ManifestError),
    /// Kafka refused the client: bad credentials, unreachable TLS, a fatal error.
    #[error("kafka {operation}: {source}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        source: KafkaError,
    },
    /// An error librdkafka reported as fatal for this client.
    #[error("kafka: {0}")]
    Fatal(String),
    /// A record could not be encoded.
    #[error("encoding record {topic}/{partition}@{offset}: {source}")]
    Encode {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// The encoder's error.
        source: serde_json::Error,
    },
}

/// The librdkafka settings for the manifest's brokers and security, secrets read from the
/// environment. PEM text (inline certificates, a private key from a variable) goes to
/// librdkafka's `*.pem` settings, which need no file: an ECS task has none to give.
pub fn client_config(kafka: &KafkaConfig) -> Result<ClientConfig, ManifestError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka.brokers.join(","));
    let mut sasl = |mechanism: &str,
                    credentials: &crate::config::SaslCredentials|
     -> Result<(), ManifestError> {
        let protocol = if credentials.tls {
            "sasl_ssl"
        } else {
            "sasl_plaintext"
        };
        trust(
            &mut config,
            credentials.ca_file.as_deref(),
            credentials.ca_pem.as_deref(),
        )
        .set("security.protocol", protocol)
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", &credentials.username)
        .set("sasl.password", credentials.password_env.read()?);
        Ok(())
    };
    match &kafka.security {
        KafkaSecurity::None => {
            config.set("security.protocol", "plaintext");
        }
        KafkaSecurity::SaslPlain(credentials) => sasl("PLAIN", credentials)?,
        KafkaSecurity::SaslScramSha256(credentials) => sasl("SCRAM-SHA-256", credentials)?,
        KafkaSecurity::SaslScramSha512(credentials) => sasl("SCRAM-SHA-512", credentials)?,
        KafkaSecurity::Ssl(tls) => {
            trust(&mut config, tls.ca_file.as_deref(), tls.ca_pem.as_deref())
                .set("security.protocol", "ssl");
            if let Some(cert) = &tls.cert_file {
                config.set("ssl.certificate.location", cert.display().to_string());
            }
            if let Some(cert) = &tls.cert_pem {
                config.set("ssl.certificate.pem", cert);
            }
            if let Some(key) = &tls.key_file {
                config.set("ssl.key.location", key.display().to_string());
            }
            if let Some(secret) = &tls.key_pem_env {
                let key = secret.read()?;
                // Caught here, a wrong variable is named; librdkafka would only say that
                // ssl.key.pem is not a key.
                if !(key.contains("-----BEGIN") && key.contains("PRIVATE KEY-----")) {
                    return Err(ManifestError::Invalid {
                        file: None,
                        path: "$.kafka.security.key_pem_env".into(),
                        message: format!(
                            "{} does not hold a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
                            secret.env_name()
                        ),
                    });
                }
                config.set("ssl.key.pem", key);
            }
            if let Some(password) = &tls.key_password_env {
                config.set("ssl.key.password", password.read()?);
            }
        }
    }
    // Back to a restarted broker within two seconds, well inside the session timeout.
    config.set("reconnect.backoff.max.ms", "2000");
    config.set_log_level(RDKafkaLogLevel::Warning);
    Ok(config)
}

/// The CA to trust instead of the system's, as a file or as PEM text.
fn trust<'a>(
    config: &'a mut ClientConfig,
    file: Option<&std::path::Path>,
    pem: Option<&str>,
) -> &'a mut ClientConfig {
    if let Some(file) = file {
        config.set("ssl.ca.location", file.display().to_string());
    }
    if let Some(pem) = pem {
        config.set("ssl.ca.pem", pem);
    }
    config
}

/// Sees librdkafka's errors and rebalances: logs assignments, and passes on the errors
/// after which retrying is pointless.
struct MemberContext {
    group: String,
    fatal: mpsc::UnboundedSender<String>,
}

impl ClientContext for MemberContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let fatal = matches!(
            code,
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::Fatal
            )
        );
        if fatal {
            let _ = self.fatal.send(format!("{error}: {reason}"));
        } else if code.is_some_and(|code| UNREADABLE.contains(&code)) {
            // Repeated at every fetch until the receive loop skips the batch, and logged there.
            tracing::debug!(group = %self.group, %error, reason, "unreadable batch");
        } else {
            tracing::warn!(group = %self.group, %error, reason, "kafka client error; retrying");
        }
    }
}

impl ConsumerContext for MemberContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let assigned: Vec<String> = partitions
                    .elements()
                    .iter()
                    .map(|p| format!("{}/{}", p.topic(), p.partition()))
                    .collect();
                tracing::info!(group = %self.group, partitions = %assigned.join(","), "partitions assigned");
            }
            Rebalance::Revoke(partitions) => {
                tracing::info!(group = %self.group, count = partitions.count(), "partitions revoked");
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "rebalance failed")
            }
        }
    }
}

/// The endpoints (and their retention) each topic of the group publishes to.
fn routes_by_topic(
    manifest: &Manifest,
    group: &ConsumerGroupConfig,
) -> HashMap<String, Vec<(EndpointName, Retention)>> {
    group
        .topics
        .iter()
        .map(|topic| {
            let endpoints = manifest
                .endpoints_of_topic(topic)
                .map(|name| (name.clone(), manifest.endpoints[name].retention))
                .collect();
            (topic.clone(), endpoints)
        })
        .collect()
}

/// Runs one member of `group` until `shutdown` resolves; then commits what it published and
/// leaves the group.
pub async fn run(
    manifest: &Manifest,
    group: &ConsumerGroupConfig,
    bus: &Bus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let context = MemberContext {
        group: group.id.clone(),
        fatal: fatal_tx,
    };
    let offset_reset = match group.offset_reset {
        OffsetReset::Earliest => "earliest",
        OffsetReset::Latest => "latest",
    };
    let consumer: StreamConsumer<MemberContext> = client_config(&manifest.kafka)?
        .set("group.id", &group.id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Offsets are stored by hand, after the bus accepted the record.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", offset_reset)
        .set("session.timeout.ms", "10000")
        // The longest a fetch waits at the broker. Records mostly end the wait as they
        // arrive, but not always: with librdkafka's 500 ms default, p99 produce → browser
        // was 480 ms in BENCHMARKS.md's e2e scenario; with 100 ms, 13-25 ms.
        .set("fetch.wait.max.ms", "100")
        .create_with_context(context)
        .map_err(|source| ConsumerError::Kafka {
            operation: "create consumer",
            source,
        })?;
    let topics: Vec<&str> = group.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| ConsumerError::Kafka {
            operation: "subscribe",
            source,
        })?;
    tracing::info!(group = %group.id, topics = %group.topics.join(","), "consumer joined");

    let routes = routes_by_topic(manifest, group);
    let mut skipper = Skipper::new(&manifest.kafka, group);
    let mut batches = Batches::new(&group.id);
    // One batch per partition in flight: the bus's idempotence counts on each endpoint
    // taking a partition's records in offset order.
    let mut in_flight = FuturesUnordered::new();
    tokio::pin!(shutdown);
    let outcome = loop {
        let message = tokio::select! {
            () = &mut shutdown => break Ok(()),
            Some(reason) = fatal_rx.recv() => break Err(ConsumerError::Fatal(reason)),
            Some(done) = in_flight.next() => {
                if let Some(next) = batches.settle(&consumer, &done) {
                    in_flight.push(publish(bus, &routes, next));
                }
                continue;
            }
            message = consumer.recv(), if batches.waiting < MAX_WAITING => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) if unreadable(&error).is_some() => {
                // The marker must follow every record of the partition read before it.
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = settle_all(&mut in_flight, &mut batches, &consumer, |next| publish(bus, &routes, next)) => {}
                }
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = skipper.skip_unreadable(&consumer, &routes, bus, &error) => {}
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(group = %group.id, %error, "kafka receive failed; retrying");
                continue;
            }
        };
        skipper.read(message.topic(), message.partition(), message.offset());
        if !routes.contains_key(message.topic()) {
            continue;
        }
        let envelope = encode(&message)?;
        if let Some(batch) = batches.add(
            message.topic(),
            message.partition(),
            message.offset(),
            envelope,
        ) {
            in_flight.push(publish(bus, &routes, batch));
        }
    };
    // What is in flight gets a moment to land, so that the final commit covers it.
    let settled = settle_all(&mut in_flight, &mut batches, &consumer, |next| {
        publish(bus, &routes, next)
    });
    if tokio::time::timeout(SHUTDOWN_SETTLE, settled)
        .await
        .is_err()
    {
        tracing::warn!(group = %group.id, "records still in flight at shutdown; the next member publishes them again, once");
    }
    tracing::info!(group = %group.id, published = batches.published, skipped = skipper.skipped, "leaving the group");
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => {
            tracing::warn!(group = %group.id, %error, "final commit failed; the next member re-reads from the last commit")
        }
    }
    drop(consumer);
    outcome
}

/// Most records read but not yet published, over all partitions: past it the member stops
/// reading until the bus catches up.
const MAX_WAITING: usize = 8192;

/// Most records in one batch, and about most bytes.
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: usize = 1 << 20;

/// How long a member that stops waits for its publishes in flight.
const SHUTDOWN_SETTLE: Duration = Duration::from_secs(5);

/// Waits for every batch in flight, and publishes what waits behind them, storing offsets
/// as they land.
async fn settle_all<F>(
    in_flight: &mut FuturesUnordered<F>,
    batches: &mut Batches,
    consumer: &StreamConsumer<MemberContext>,
    publish: impl Fn(OwnedBatch) -> F,
) where
    F: Future<Output = PublishedBatch>,
{
    while let Some(done) = in_flight.next().await {
        if let Some(next) = batches.settle(consumer, &done) {
            in_flight.push(publish(next));
        }
    }
}

/// Records read and not yet published, per partition, and which partitions have a batch in
/// flight. While one is, the records that arrive make the next, so a batch grows with the
/// load and the bus's round trip: one record when idle, up to [`BATCH_RECORDS`] under load.
struct Batches {
    group: String,
    /// By topic, then partition: the records waiting, and whether a batch is in flight.
    partitions: HashMap<String, HashMap<i32, PartitionBatches>>,
    /// Records waiting, over all partitions.
    waiting: usize,
    /// Records published since start.
    published: u64,
}

#[derive(Default)]
struct PartitionBatches {
    waiting: VecDeque<(i64, Envelope)>,
    in_flight: bool,
}

/// A batch taken to publish.
struct OwnedBatch {
    topic: String,
    partition: i32,
    records: Vec<(i64, Envelope)>,
}

/// A batch the bus accepted.
struct PublishedBatch {
    topic: String,
    partition: i32,
    last_offset: i64,
    records: u64,
}

impl Batches {
    fn new(group: &str) -> Self {
        Self {
            group: group.to_owned(),
            partitions: HashMap::new(),
            waiting: 0,
            published: 0,
        }
    }

    /// Stores the offset of a batch the bus accepted; returns its partition's next batch,
    /// if records wait.
    fn settle(
        &mut self,
        consumer: &StreamConsumer<MemberContext>,
        done: &PublishedBatch,
    ) -> Option<OwnedBatch> {
        if let Err(error) = consumer.store_offset(&done.topic, done.partition, done.last_offset) {
            // The partition was revoked meanwhile; its new owner reads the records again
            // and the idempotent publish drops them.
            tracing::debug!(%error, "offset not stored");
        }
        let before = self.published;
        self.published += done.records;
        if before / 10_000 != self.published / 10_000 {
            tracing::info!(group = %self.group, published = self.published, "records published");
        }
        let entry = self
            .partitions
            .get_mut(&done.topic)?
            .get_mut(&done.partition)?;
        entry.in_flight = false;
        self.take(&done.topic, done.partition)
    }

    /// Adds a record; returns a batch to publish now if its partition has none in flight.
    fn add(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        envelope: Envelope,
    ) -> Option<OwnedBatch> {
        let partitions = match self.partitions.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.partitions.entry(topic.to_owned()).or_default(),
        };
        let entry = partitions.entry(partition).or_default();
        entry.waiting.push_back((offset, envelope));
        self.waiting += 1;
        if entry.in_flight {
            return None;
        }
        self.take(topic, partition)
    }

    fn take(&mut self, topic: &str, partition: i32) -> Option<OwnedBatch> {
        let entry = self.partitions.get_mut(topic)?.get_mut(&partition)?;
        if entry.waiting.is_empty() {
            return None;
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        while let Some((_, envelope)) = entry.waiting.front() {
            if records.len() == BATCH_RECORDS
                || (bytes > 0 && bytes + envelope.json.len() > BATCH_BYTES)
            {
                break;
            }
            bytes += envelope.json.len();
            records.extend(entry.waiting.pop_front());
        }
        entry.in_flight = true;
        self.waiting -= records.len();
        Some(OwnedBatch {
            topic: topic.to_owned(),
            partition,
            records,
        })
    }
}

/// Publishes `batch`, retrying for as long as the bus refuses.
async fn publish(
    bus: &Bus,
    routes: &HashMap<String, Vec<(EndpointName, Retention)>>,
    batch: OwnedBatch,
) -> PublishedBatch {
    let OwnedBatch {
        topic,
        partition,
        records,
    } = batch;
    let (first_offset, last_offset) = match (records.first(), records.last()) {
        (Some((first, _)), Some((last, _))) => (*first, *last),
        _ => (0, -1),
    };
    if let Some(endpoints) = routes.get(&topic) {
        until_accepted(&topic, partition, first_offset, || {
            bus.publish_batch(Batch {
                topic: &topic,
                partition,
                endpoints,
                records: &records,
            })
        })
        .await;
    }
    PublishedBatch {
        topic,
        partition,
        last_offset,
        records: u64::try_from(records.len()).unwrap_or(u64::MAX),
    }
}

/// The error codes with which librdkafka reports a batch it cannot read at all: a corrupt
/// or undecodable payload, an unknown codec or format. librdkafka fetches the same batch
/// again; the error it raises carries the partition and offset, but rdkafka hands over
/// only the code.
const UNREADABLE: [RDKafkaErrorCode; 6] = [
    RDKafkaErrorCode::BadCompression,
    RDKafkaErrorCode::BadMessage,
    RDKafkaErrorCode::NotImplemented,
    RDKafkaErrorCode::InvalidMessage,
    RDKafkaErrorCode::InvalidRecord,
    RDKafkaErrorCode::UnsupportedCompressionType,
];

/// The code of a receive error that means a batch cannot be read.
fn unreadable(error: &KafkaError) -> Option<RDKafkaErrorCode> {
    match error {
        KafkaError::MessageConsumption(code) if UNREADABLE.contains(code) => Some(*code),
        _ => None,
    }
}

/// The probe's client: its errors are the point of probing, not news.
struct ProbeContext;

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "probe client error");
    }
}

impl ConsumerContext for ProbeContext {}

/// How long a probe waits for its first answer, and the group's broker calls for theirs.
const PROBE_PATIENCE: Duration = Duration::from_secs(10);

/// What a probe read first at an offset.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// A record, or the end of the partition.
    Readable,
    /// An error that means the batch there cannot be read.
    Unreadable(RDKafkaErrorCode),
    /// Nothing in time.
    NoAnswer,
}

/// Finds and skips what librdkafka cannot read. The member's own consumer cannot say which
/// partition failed, so a probe — a consumer outside the group, one partition assigned at a
/// time — reads each partition that is behind from where the member stands: one whose
/// first answer is an unreadable-batch error is stuck. The probe then steps on one offset at a
/// time (a compressed batch holds several, and librdkafka fails all of them) to the first
/// readable one. One fetch per step; a rare path, kept exact rather than fast.
struct Skipper<'a> {
    kafka: &'a KafkaConfig,
    group: &'a ConsumerGroupConfig,
    probe: Option<StreamConsumer<ProbeContext>>,
    /// The next offset per topic and partition, as the member read or skipped; by topic
    /// first, so that noting a record allocates nothing.
    next: HashMap<String, HashMap<i32, i64>>,
    /// Records skipped since start.
    skipped: u64,
    /// Whether a failure to find the stuck partition was logged since the last skip.
    unlocated_logged: bool,
}

impl<'a> Skipper<'a> {
    fn new(kafka: &'a KafkaConfig, group: &'a ConsumerGroupConfig) -> Self {
        Self {
            kafka,
            group,
            probe: None,
            next: HashMap::new(),
            skipped: 0,
            unlocated_logged: false,
        }
    }

    /// Notes a record the member read.
    fn read(&mut self, topic: &str, partition: i32, offset: i64) {
        self.set_next(topic, partition, offset + 1);
    }

    fn set_next(&mut self, topic: &str, partition: i32, next: i64) {
        match self.next.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, next);
            }
            None => {
                self.next
                    .insert(topic.to_owned(), HashMap::from([(partition, next)]));
            }
        }
    }

    /// Finds the partition `error` came from and the records it cannot read; publishes a
    /// marker for them to the endpoints of its topic and moves the member past them.
    async fn skip_unreadable(
        &mut self,
        consumer: &StreamConsumer<MemberContext>,
        routes: &HashMap<String, Vec<(EndpointName, Retention)>>,
        bus: &Bus,
        error: &KafkaError,
    ) {
        // librdkafka repeats the error at every fetch: a failure to find the batch is
        // logged once until a skip succeeds, then at debug level.
        let located = match self.locate(consumer).await {
            Ok(located) => located,
            Err(probe_error) => {
                if std::mem::replace(&mut self.unlocated_logged, true) {
                    tracing::debug!(%error, %probe_error, "probe failed");
                } else {
                    tracing::warn!(group = %self.group.id, %error, %probe_error, "a batch cannot be read, and the probe that looks for it failed; trying again at each error");
                }
                return;
            }
        };
        let Some(skipped) = located else {
            if std::mem::replace(&mut self.unlocated_logged, true) {
                tracing::debug!(%error, "no stuck partition found");
            } else {
                tracing::warn!(group = %self.group.id, %error, "a batch cannot be read, but no partition is stuck where the group stands: an error of a batch already skipped, or of a partition the member has not read from yet; looking again at each error");
            }
            return;
        };
        self.unlocated_logged = false;
        if let Some(endpoints) = routes.get(&skipped.topic) {
            until_accepted(
                &skipped.topic,
                skipped.partition,
                skipped.last_offset,
                || bus.publish_skipped(&skipped, endpoints),
            )
            .await;
        }
        let next = skipped.last_offset + 1;
        if let Err(seek_error) = consumer.seek(
            &skipped.topic,
            skipped.partition,
            Offset::Offset(next),
            PROBE_PATIENCE,
        ) {
            // Revoked meanwhile: the new owner finds the batch, and the marker is there.
            tracing::debug!(%seek_error, "seek past unreadable records failed");
        }
        if let Err(store_error) =
            consumer.store_offset(&skipped.topic, skipped.partition, skipped.last_offset)
        {
            tracing::debug!(%store_error, "offset not stored");
        }
        self.set_next(&skipped.topic, skipped.partition, next);
        let count = skipped.last_offset - skipped.first_offset + 1;
        self.skipped += u64::try_from(count).unwrap_or(0);
        tracing::warn!(
            group = %self.group.id,
            topic = %skipped.topic,
            partition = skipped.partition,
            first_offset = skipped.first_offset,
            last_offset = skipped.last_offset,
            error = %skipped.error,
            skipped_total = self.skipped,
            "skipped records that cannot be read; clients were sent fjord.gap"
        );
    }

    /// The first stretch of unreadable records of an assigned partition, from where the
    /// member stands in it.
    async fn locate(
        &mut self,
        consumer: &StreamConsumer<MemberContext>,
    ) -> Result<Option<SkippedRecords>, KafkaError> {
        let assignment = consumer.assignment()?;
        let committed = consumer
            .committed_offsets(assignment.clone(), PROBE_PATIENCE)?
            .to_topic_map();
        let mut partitions: Vec<(String, i32)> = committed.keys().cloned().collect();
        partitions.sort();
        for (topic, partition) in partitions {
            let (topic, partition) = (topic.as_str(), partition);
            let committed = match committed.get(&(topic.to_owned(), partition)) {
                Some(Offset::Offset(offset)) => Some(*offset),
                _ => None,
            };
            let read = self
                .next
                .get(topic)
                .and_then(|partitions| partitions.get(&partition))
                .copied();
            let (low, high) = consumer.fetch_watermarks(topic, partition, PROBE_PATIENCE)?;
            let from = match (read.max(committed), self.group.offset_reset) {
                (Some(offset), _) => offset.max(low),
                (None, OffsetReset::Earliest) => low,
                // Where a member that starts at the end began is not known here.
                (None, OffsetReset::Latest) => continue,
            };
            if from >= high {
                continue;
            }
            let Probe::Unreadable(code) = self.probe(topic, partition, from).await? else {
                continue;
            };
            let mut last = from;
            while last + 1 < high {
                match self.probe(topic, partition, last + 1).await? {
                    Probe::Unreadable(_) => last += 1,
                    Probe::Readable => break,
                    // Where the batch ends is unknown: skip nothing now, look again later.
                    Probe::NoAnswer => return Ok(None),
                }
            }
            return Ok(Some(SkippedRecords {
                topic: topic.to_owned(),
                partition,
                first_offset: from,
                last_offset: last,
                error: code.to_string(),
            }));
        }
        Ok(None)
    }

    /// What the probe reads first at `offset` of one partition.
    async fn probe(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Probe, KafkaError> {
        let probe = match &mut self.probe {
            Some(probe) => probe,
            slot @ None => slot.insert(
                client_config(self.kafka)
                    .map_err(|error| KafkaError::ClientCreation(error.to_string()))?
                    // Without a group id, rdkafka polls the main queue and never sees the
                    // fetched records. The probe only assigns: it never joins or commits.
                    .set("group.id", format!("{}.probe", self.group.id))
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("enable.partition.eof", "true")
                    .set("fetch.wait.max.ms", "100")
                    .create_with_context(ProbeContext)?,
            ),
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        probe.assign(&assignment)?;
        let answer = tokio::time::timeout(PROBE_PATIENCE, async {
            loop {
                match probe.recv().await {
                    // Anything from an earlier assignment is older than `offset`.
                    Ok(message)
                        if message.topic() == topic
                            && message.partition() == partition
                            && message.offset() >= offset =>
                    {
                        return Probe::Readable;
                    }
                    Err(KafkaError::PartitionEOF(eof)) if eof == partition => {
                        return Probe::Readable;
                    }
                    Err(error) => {
                        if let Some(code) = unreadable(&error) {
                            return Probe::Unreadable(code);
                        }
                        tracing::debug!(%error, "probe error");
                    }
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(Probe::NoAnswer);
        probe.unassign()?;
        Ok(answer)
    }
}

fn encode(message: &BorrowedMessage<'_>) -> Result<Envelope, ConsumerError> {
    let parts = RecordParts {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key(),
        timestamp: message.timestamp().to_millis(),
        value: message.payload(),
    };
    let headers = message
        .headers()
        .into_iter()
        .flat_map(|headers| headers.iter())
        .map(|header| (header.key, header.value));
    Envelope::encode(parts, headers).map_err(|source| ConsumerError::Encode {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        source,
    })
}

/// Runs `publish` (of the record or marker at `topic`/`partition`/`offset`), retrying with
/// backoff for as long as the bus refuses.
async fn until_accepted<F, T>(topic: &str, partition: i32, offset: i64, publish: impl Fn() -> F)
where
    F: Future<Output = Result<T, BusError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match publish().await {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    %error,
                    retry_in = ?backoff,
                    "bus refused the record; holding the partition until it accepts"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_of_a_batch_that_cannot_be_read_are_unreadable() {
        for code in UNREADABLE {
            assert_eq!(
                unreadable(&KafkaError::MessageConsumption(code)),
                Some(code)
            );
        }
        for error in [
            KafkaError::PartitionEOF(0),
            KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure),
            KafkaError::Global(RDKafkaErrorCode::BadCompression),
        ] {
            assert_eq!(unreadable(&error), None, "{error}");
        }
    }
}
