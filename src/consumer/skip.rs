//! Finding and skipping what librdkafka cannot read. A batch that cannot be read at all (a
//! corrupt compressed payload, an unknown codec) would stop its partition for good:
//! librdkafka reports an error without saying where and fetches the same batch again,
//! forever. The member finds the partition and the offsets the batch covers with a probe of
//! its own, publishes a marker of the skipped records to the bus (clients get `fjord.gap`),
//! and seeks past them. A record read but not decodable by its topic's format is skipped
//! the same way, with its own reason, and counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::decode::Undecodable;
use super::{MemberContext, Routes, client_config, until_accepted};
use fjord_bus::{Bus, SkipReason, SkippedRecords};
use fjord_config::{ConsumerGroupConfig, KafkaConfig, OffsetReset};

/// The error codes with which librdkafka reports a batch it cannot read at all: a corrupt
/// or undecodable payload, an unknown codec or format. librdkafka fetches the same batch
/// again; the error it raises carries the partition and offset, but rdkafka hands over
/// only the code.
pub(super) const UNREADABLE: [RDKafkaErrorCode; 6] = [
    RDKafkaErrorCode::BadCompression,
    RDKafkaErrorCode::BadMessage,
    RDKafkaErrorCode::NotImplemented,
    RDKafkaErrorCode::InvalidMessage,
    RDKafkaErrorCode::InvalidRecord,
    RDKafkaErrorCode::UnsupportedCompressionType,
];

/// The code of a receive error that means a batch cannot be read.
pub(super) fn unreadable(error: &KafkaError) -> Option<RDKafkaErrorCode> {
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
pub(super) struct Skipper<'a> {
    kafka: &'a KafkaConfig,
    group: &'a ConsumerGroupConfig,
    probe: Option<StreamConsumer<ProbeContext>>,
    /// The next offset per topic and partition, as the member read or skipped; by topic
    /// first, so that noting a record allocates nothing.
    next: HashMap<String, HashMap<i32, i64>>,
    /// Records skipped since start.
    pub(super) skipped: u64,
    /// Whether a failure to find the stuck partition was logged since the last skip.
    unlocated_logged: bool,
    /// Records skipped as undecodable since start.
    pub(super) undecodable: u64,
    /// When undecodable records were last logged, and how many were skipped since.
    undecodable_logged: Option<(Instant, u64)>,
}

/// How often skipped undecodable records are logged: a topic of them must not flood the log.
const UNDECODABLE_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl<'a> Skipper<'a> {
    pub(super) fn new(kafka: &'a KafkaConfig, group: &'a ConsumerGroupConfig) -> Self {
        Self {
            kafka,
            group,
            probe: None,
            next: HashMap::new(),
            skipped: 0,
            unlocated_logged: false,
            undecodable: 0,
            undecodable_logged: None,
        }
    }

    /// Publishes a marker for a record that cannot be decoded to the endpoints of its topic,
    /// and stores its offset: the partition moves on past it. The caller has published every
    /// record read before it.
    pub(super) async fn skip_undecodable(
        &mut self,
        consumer: &StreamConsumer<MemberContext>,
        routes: &Routes,
        bus: &Bus,
        message: &BorrowedMessage<'_>,
        undecodable: &Undecodable,
    ) {
        let skipped = SkippedRecords {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            first_offset: message.offset(),
            last_offset: message.offset(),
            error: undecodable.to_string(),
            reason: SkipReason::UndecodableRecord,
        };
        if let Some(endpoints) = routes.get(&skipped.topic) {
            until_accepted(
                &skipped.topic,
                skipped.partition,
                skipped.last_offset,
                || bus.publish_skipped(&skipped, endpoints),
            )
            .await;
        }
        if let Err(store_error) =
            consumer.store_offset(&skipped.topic, skipped.partition, skipped.last_offset)
        {
            tracing::debug!(%store_error, "offset not stored");
        }
        self.undecodable += 1;
        let now = Instant::now();
        match &mut self.undecodable_logged {
            Some((at, since)) if now.duration_since(*at) < UNDECODABLE_LOG_INTERVAL => *since += 1,
            logged => {
                let since = logged.map_or(0, |(_, since)| since);
                *logged = Some((now, 0));
                tracing::warn!(
                    group = %self.group.id,
                    topic = %skipped.topic,
                    partition = skipped.partition,
                    offset = skipped.last_offset,
                    error = %skipped.error,
                    undecodable_total = self.undecodable,
                    skipped_unlogged = since,
                    "skipped a record that cannot be decoded; clients were sent fjord.gap (one line per 10 s at most)"
                );
            }
        }
    }

    /// Notes a record the member read.
    pub(super) fn read(&mut self, topic: &str, partition: i32, offset: i64) {
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
    pub(super) async fn skip_unreadable(
        &mut self,
        consumer: &StreamConsumer<MemberContext>,
        routes: &Routes,
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
                reason: SkipReason::UnreadableRecord,
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
