//! A consumer-group member: reads its share of the group's partitions, encodes each record
//! once into an envelope, publishes it to the bus ([`batches`]), and only then stores its
//! offset for the next commit — so a record is committed only after the bus holds it
//! (at-least-once), and the bus's idempotent publish turns a second delivery after a crash
//! into a no-op. A batch librdkafka cannot read is skipped with a marker ([`skip`]).
//!
//! A record's key and value are decoded by its topic's format ([`decode`]), with writers'
//! schemas from the Schema Registry ([`registry`]). A record that cannot be decoded is
//! skipped with a marker too; while the registry is down, the member waits for it with the
//! record in hand, so nothing past it is published or committed.
//!
//! While the bus is unreachable the member stops reading once 8,192 records wait
//! (backpressure) and retries the same batch; it never skips a record it can read.
//!
//! It links the bus, the envelope, backoff and clock (`fjord-bus`) and the manifest
//! (`fjord-config`), not the server's web stack (`ci/check-parts.sh`).

mod batches;
pub mod decode;
pub mod registry;
mod skip;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio::sync::mpsc;

use self::batches::{InFlight, Publisher};
use self::decode::{Decoder, Outcome};
use self::skip::{Skipper, UNREADABLE, unreadable};
use fjord_bus::backoff::Backoff;
use fjord_bus::envelope::{Decoded, Envelope, RecordParts};
use fjord_bus::{Bus, BusError};
use fjord_config::{
    ConsumerGroupConfig, EndpointName, KafkaConfig, KafkaSecurity, Keeping, Manifest,
    ManifestError, OffsetReset,
};

/// Why a consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The manifest's Kafka settings could not be applied.
    #[error(transparent)]
    Config(#[from] ManifestError),
    /// Kafka refused the client: bad credentials, unreachable TLS, a fatal error.
    #[error("kafka {operation}")]
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
    #[error("encoding record {topic}/{partition}@{offset}")]
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
                    credentials: &fjord_config::SaslCredentials|
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

/// Sees librdkafka's errors and rebalances: logs assignments, says whether the member holds
/// partitions, and passes on the errors after which retrying is pointless.
struct MemberContext {
    group: String,
    fatal: mpsc::UnboundedSender<String>,
    in_flight: Arc<InFlight>,
    readiness: Readiness,
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
    /// Before partitions go, waits for their batches in flight and commits what they
    /// published, so that their next owner starts after it rather than reading it again.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: Vec<(String, i32)> = revoked
            .elements()
            .iter()
            .map(|p| (p.topic().to_owned(), p.partition()))
            .collect();
        // The callback runs inside the member's own task; its publishing tasks can land
        // meanwhile only on a runtime with other threads.
        let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        let (offsets, settled) = if multi_thread {
            tokio::task::block_in_place(|| self.in_flight.settle(&partitions, REVOKE_PATIENCE))
        } else {
            self.in_flight.settle(&partitions, Duration::ZERO)
        };
        if !settled {
            tracing::warn!(group = %self.group, "partitions revoked with publishes still in flight; their next owner publishes those records again, once");
        }
        for ((topic, partition), offset) in &offsets {
            if let Err(error) = consumer.store_offset(topic, *partition, *offset) {
                tracing::debug!(%error, "offset not stored");
            }
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => {
                tracing::warn!(group = %self.group, %error, "commit before a rebalance failed; the next owner re-reads from the last commit")
            }
        }
        tracing::info!(group = %self.group, partitions = partitions.len(), committed = offsets.len(), "publishes of revoked partitions settled");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let assigned: Vec<String> = partitions
                    .elements()
                    .iter()
                    .map(|p| format!("{}/{}", p.topic(), p.partition()))
                    .collect();
                tracing::info!(group = %self.group, partitions = %assigned.join(","), "partitions assigned");
                self.readiness
                    .send_replace((assigned.is_empty()).then_some(UNASSIGNED));
            }
            Rebalance::Revoke(partitions) => {
                self.readiness.send_replace(Some(UNASSIGNED));
                tracing::info!(group = %self.group, count = partitions.count(), "partitions revoked");
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "rebalance failed")
            }
        }
    }
}

/// Why a member is not consuming, for a readiness probe of its process: `None` while it
/// holds partitions and is not holding one back.
pub type Readiness = tokio::sync::watch::Sender<Option<&'static str>>;

/// Before the member holds partitions, and between a rebalance's revoke and assign.
pub const UNASSIGNED: &str = "the consumer has not been assigned its partitions yet";

/// While a record waits for the Schema Registry.
pub const REGISTRY_DOWN: &str =
    "the consumer is holding its partitions back: the schema registry does not answer";

/// A readiness channel in its first state, [`UNASSIGNED`].
pub fn readiness() -> (
    Readiness,
    tokio::sync::watch::Receiver<Option<&'static str>>,
) {
    tokio::sync::watch::channel(Some(UNASSIGNED))
}

/// The endpoints (and their retention) each topic of the group publishes to.
type Routes = HashMap<String, Vec<(EndpointName, Keeping)>>;

/// How long a member that stops waits for its publishes in flight.
const SHUTDOWN_SETTLE: Duration = Duration::from_secs(5);

/// How long a rebalance waits for the publishes of the partitions it takes away.
const REVOKE_PATIENCE: Duration = Duration::from_secs(10);

fn routes_by_topic(manifest: &Manifest, group: &ConsumerGroupConfig) -> Routes {
    group
        .topics
        .iter()
        .map(|topic| {
            let endpoints = manifest
                .endpoints_of_topic(topic)
                .map(|name| (name.clone(), manifest.endpoints[name].keeping()))
                .collect();
            (topic.clone(), endpoints)
        })
        .collect()
}

/// Runs one member of `group` until `shutdown` resolves; then commits what it published and
/// leaves the group. `readiness` is `None` while the member holds partitions and holds none
/// back: from then on, a record produced to them is read (from the group's committed
/// offsets, or from where `offset_reset` says), which is what a readiness probe of a
/// consuming process waits for. While a record waits for the Schema Registry it says
/// [`REGISTRY_DOWN`].
pub async fn run(
    manifest: &Manifest,
    group: &ConsumerGroupConfig,
    bus: &Bus,
    shutdown: impl Future<Output = ()>,
    readiness: Readiness,
) -> Result<(), ConsumerError> {
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(InFlight::default());
    let context = MemberContext {
        group: group.id.clone(),
        fatal: fatal_tx,
        in_flight: Arc::clone(&in_flight),
        readiness: readiness.clone(),
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

    let routes = Arc::new(routes_by_topic(manifest, group));
    let mut decoder = Decoder::new(manifest)?;
    let mut skipper = Skipper::new(&manifest.kafka, group);
    let mut publisher = Publisher::new(&group.id, bus, Arc::clone(&routes), in_flight);
    tokio::pin!(shutdown);
    let outcome = loop {
        let full = publisher.is_full();
        let message = tokio::select! {
            () = &mut shutdown => break Ok(()),
            Some(reason) = fatal_rx.recv() => break Err(ConsumerError::Fatal(reason)),
            landed = publisher.next_landed() => {
                publisher.settle(&consumer, &landed);
                continue;
            }
            message = consumer.recv(), if !full => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) if unreadable(&error).is_some() => {
                // The marker must follow every record of the partition read before it.
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = publisher.settle_all(&consumer) => {}
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
        // At once, unless a schema must be fetched first: that alone waits (and may be
        // cut short by the shutdown).
        let decoded = match decoder.decode(message.topic(), message.key(), message.payload()) {
            Outcome::Decoded(decoded) => Ok(decoded),
            Outcome::Undecodable(undecodable) => Err(undecodable),
            Outcome::Fetch(id) => tokio::select! {
                () = &mut shutdown => break Ok(()),
                decoded = fetch_and_decode(&mut decoder, &message, id, &readiness) => decoded,
            },
        };
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(undecodable) => {
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = publisher.settle_all(&consumer) => {}
                }
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = skipper.skip_undecodable(&consumer, &routes, bus, &message, &undecodable) => {}
                }
                continue;
            }
        };
        let envelope = encode(&message, &decoded)?;
        publisher.add(
            message.topic(),
            message.partition(),
            message.offset(),
            envelope,
        );
    };
    // What is in flight gets a moment to land, so that the final commit covers it.
    if tokio::time::timeout(SHUTDOWN_SETTLE, publisher.settle_all(&consumer))
        .await
        .is_err()
    {
        tracing::warn!(group = %group.id, "records still in flight at shutdown; the next member publishes them again, once");
    }
    tracing::info!(group = %group.id, published = publisher.published, skipped = skipper.skipped, undecodable = skipper.undecodable, "leaving the group");
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

/// Fetches the schema with `id` that `message` needs, then decodes it; while the registry
/// is down, waits with the shared backoff and tries again, holding the record (and so its
/// partition) back.
async fn fetch_and_decode(
    decoder: &mut Decoder<'_>,
    message: &BorrowedMessage<'_>,
    mut id: u32,
    readiness: &Readiness,
) -> Result<Decoded, decode::Undecodable> {
    let mut backoff = None;
    let mut down_since = None;
    loop {
        match decoder.fetch(id).await {
            Ok(()) => {
                let decoded =
                    match decoder.decode(message.topic(), message.key(), message.payload()) {
                        // The key's schema is in; the value's is another.
                        Outcome::Fetch(next) => {
                            id = next;
                            continue;
                        }
                        Outcome::Decoded(decoded) => Ok(decoded),
                        Outcome::Undecodable(undecodable) => Err(undecodable),
                    };
                if let Some(since) = down_since {
                    readiness.send_if_modified(|now| {
                        let held = *now == Some(REGISTRY_DOWN);
                        if held {
                            *now = None;
                        }
                        held
                    });
                    tracing::info!(topic = message.topic(), partition = message.partition(), offset = message.offset(), down_for = ?std::time::Instant::now().duration_since(since), "schema registry answers again; the partition moves on");
                }
                return decoded;
            }
            Err(reason) => {
                let retry_in = backoff
                    .get_or_insert_with(|| {
                        Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
                    })
                    .next_delay();
                if down_since.is_none() {
                    down_since = Some(std::time::Instant::now());
                    // Not over a revoke's UNASSIGNED: the member holds nothing then.
                    readiness.send_if_modified(|now| {
                        let assigned = now.is_none();
                        if assigned {
                            *now = Some(REGISTRY_DOWN);
                        }
                        assigned
                    });
                    tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %reason, ?retry_in, "schema registry unavailable; holding the partition at this record until it answers");
                } else {
                    tracing::debug!(%reason, ?retry_in, "schema registry still unavailable");
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

fn encode(message: &BorrowedMessage<'_>, decoded: &Decoded) -> Result<Envelope, ConsumerError> {
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
    Envelope::encode_decoded(parts, headers, decoded).map_err(|source| ConsumerError::Encode {
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
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match publish().await {
            Ok(_) => return,
            Err(error) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    %error,
                    ?retry_in,
                    "bus refused the record; holding the partition until it accepts"
                );
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}
