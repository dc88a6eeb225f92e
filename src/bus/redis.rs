//! The bus on Redis Streams: one stream per endpoint (`{prefix}:stream:<endpoint>`), trimmed
//! to the endpoint's retention by count and age; a hash of the highest offset published per
//! topic partition (`{prefix}:published`) that makes publishing idempotent; and a hash of
//! each stream's last id (`{prefix}:last-ids`) for telling trimmed records (a gap) apart.
//! The braces are a Redis Cluster hash tag: every key of one deployment lives in one slot,
//! so the publish script may touch them all atomically. Streams and ids survive a Redis
//! restart when Redis persists (AOF), which resuming depends on.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, Script, Value};

use super::entry::decode;
use super::{Append, AppendKind, BusEntry, BusError, Published, READ_BATCH, StreamId};
use crate::config::{EndpointName, RedisConfig};

/// How long one blocking read waits for new entries.
const READ_BLOCK: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Appends one entry (a record, or a marker of skipped records) to each endpoint stream
/// unless its partition already reached its offset; then records the offset. Atomic, so a crash cannot leave half a publication.
/// Each entry carries the id of the entry before it (`p`): retention trims from the head,
/// so the oldest kept entry's `p` tells exactly whether anything after a client's last id
/// was trimmed. The last id per stream is kept in a hash, as the stream may be empty.
///
/// KEYS: the endpoint streams, then the published-offsets hash, then the last-ids hash.
/// ARGV: "topic/partition", offset, kind ("1" keyed record, "0" record without a key, "s"
/// skipped-records marker, stored with a field `s`), key, envelope or marker, then per
/// stream its max records and max age in milliseconds.
const PUBLISH_SCRIPT: &str = r"
local streams = #KEYS - 2
local published, last_ids = KEYS[streams + 1], KEYS[streams + 2]
local offset = tonumber(ARGV[2])
local last = redis.call('HGET', published, ARGV[1])
if last and tonumber(last) >= offset then return 0 end
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 1, streams do
  local max_records = ARGV[4 + 2 * i]
  local max_age_ms = tonumber(ARGV[5 + 2 * i])
  local previous = redis.call('HGET', last_ids, KEYS[i]) or '0-0'
  local id
  if ARGV[3] == '1' then
    id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', max_records, '*', 'e', ARGV[5], 'p', previous, 'k', ARGV[4])
  elseif ARGV[3] == 's' then
    id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', max_records, '*', 'e', ARGV[5], 'p', previous, 's', '1')
  else
    id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', max_records, '*', 'e', ARGV[5], 'p', previous)
  end
  redis.call('HSET', last_ids, KEYS[i], id)
  if now_ms > max_age_ms then
    redis.call('XTRIM', KEYS[i], 'MINID', '~', now_ms - max_age_ms)
  end
end
redis.call('HSET', published, ARGV[1], ARGV[2])
return 1
";

/// The Redis bus.
#[derive(Clone)]
pub struct RedisBus {
    client: Client,
    commands: ConnectionManager,
    prefix: String,
    publish_script: Script,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn redis_error(operation: &'static str) -> impl FnOnce(redis::RedisError) -> BusError {
    move |source| BusError::Redis { operation, source }
}

/// Sorts a failure to connect: [`BusError::Refused`] when retrying cannot help (credentials,
/// TLS, the URL), else [`BusError::Redis`] for a Redis not reachable yet.
fn refused_or_unreachable(
    config: &RedisConfig,
    operation: &'static str,
) -> impl FnOnce(redis::RedisError) -> BusError {
    move |source| match refusal(config, &source) {
        Some(problem) => BusError::Refused {
            url: config.url.clone(),
            problem,
            error: source,
        },
        None => BusError::Redis { operation, source },
    }
}

/// Sorts a failed first connection. A plain-text Redis waits for the end of a command line
/// that a TLS greeting never sends, so `rediss://` to its port times out rather than fails:
/// a plain PING tells that case apart.
async fn connect_failure(
    config: &RedisConfig,
    client: &Client,
    error: redis::RedisError,
) -> BusError {
    if let ConnectionAddr::TcpTls { host, port, .. } = client.get_connection_info().addr()
        && error.is_timeout()
        && speaks_plain_redis(host, *port).await
    {
        return BusError::Refused {
            url: config.url.clone(),
            problem: "this port speaks Redis without TLS: use redis://, or Redis's TLS port"
                .to_owned(),
            error,
        };
    }
    refused_or_unreachable(config, "connect")(error)
}

/// Whether `host:port` answers a plain-text PING as Redis without TLS does (`+PONG`, or an
/// error such as `-NOAUTH`); a TLS port answers with an alert record or closes.
async fn speaks_plain_redis(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], b'+' | b'-'))
    };
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// What Redis refused, in words that point at the setting to fix; `None` for failures that
/// may pass (refused or dropped connections, timeouts, name resolution, loading).
fn refusal(config: &RedisConfig, error: &redis::RedisError) -> Option<String> {
    let user = config.username.as_deref().map_or_else(
        || "the default user".to_owned(),
        |name| format!("user {name:?}"),
    );
    let password = config.password_env.as_ref().map_or_else(
        || "no password (redis.password_env is not set)".to_owned(),
        |secret| format!("the password in {}", secret.env_name()),
    );
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return Some(format!(
            "authentication as {user} with {password} failed: wrong password, or an unknown or disabled user"
        ));
    }
    match error.code() {
        Some("NOAUTH") => {
            return Some(format!(
                "Redis requires a password and Fjord has {password}"
            ));
        }
        Some("NOPERM") => return Some(format!("{user} may not run Fjord's commands")),
        _ => {}
    }
    if error.kind() == redis::ErrorKind::InvalidClientConfig {
        return Some("the URL cannot be used".to_owned());
    }
    let roots = std::env::var_os("SSL_CERT_FILE").map_or_else(
        || "the system's CA certificates".to_owned(),
        |file| {
            format!(
                "the CA bundle in SSL_CERT_FILE ({})",
                file.to_string_lossy()
            )
        },
    );
    match tls_failure(error)? {
        TlsFailure::TrustRoots => Some(format!("cannot load the TLS trust roots, {roots}")),
        TlsFailure::Untrusted => Some(format!(
            "its TLS certificate is not valid for this host or not signed by {roots}"
        )),
        TlsFailure::Handshake => Some(
            "the TLS handshake failed: is this Redis's TLS port? (rediss:// needs one)".to_owned(),
        ),
    }
}

/// Why a TLS connection could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsFailure {
    /// The trust roots could not be read.
    TrustRoots,
    /// The server's certificate was not accepted.
    Untrusted,
    /// The peer does not speak TLS, or not a version or suite in common.
    Handshake,
}

fn tls_failure(error: &redis::RedisError) -> Option<TlsFailure> {
    // The client keeps I/O errors as `Arc<dyn Error>`; tokio-rustls wraps rustls's error in
    // an `io::Error`.
    let inner = std::error::Error::source(error)?
        .downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()?;
    if inner.is::<rustls_native_certs::Error>() {
        return Some(TlsFailure::TrustRoots);
    }
    let tls = inner
        .downcast_ref::<std::io::Error>()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(_) => TlsFailure::Untrusted,
        _ => TlsFailure::Handshake,
    })
}

/// The key of an endpoint's stream.
pub fn stream_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{{{prefix}}}:stream:{endpoint}")
}

fn published_key(prefix: &str) -> String {
    format!("{{{prefix}}}:published")
}

fn last_ids_key(prefix: &str) -> String {
    format!("{{{prefix}}}:last-ids")
}

impl RedisBus {
    /// Connects to the Redis the manifest names, as its ACL user with the password from the
    /// environment, over TLS for `rediss://`, and checks that Redis accepts commands.
    pub async fn connect(config: &RedisConfig) -> Result<Self, BusError> {
        // The workspace builds rustls with two crypto providers, and rustls then refuses to
        // pick one for the redis client's TLS config; an error means one is already set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(refused_or_unreachable(config, "parse url"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &config.username {
            settings = settings.set_username(username);
        }
        if let Some(secret) = &config.password_env {
            settings = settings.set_password(secret.read()?);
        }
        info = info.set_redis_settings(settings);
        let client = Client::open(info).map_err(refused_or_unreachable(config, "open"))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let commands = match client
            .get_connection_manager_with_config(manager_config)
            .await
        {
            Ok(commands) => commands,
            Err(error) => return Err(connect_failure(config, &client, error).await),
        };
        let bus = Self {
            client,
            commands,
            prefix: config.key_prefix.clone(),
            publish_script: Script::new(PUBLISH_SCRIPT),
        };
        // Without a password the connection succeeds and only commands fail (NOAUTH).
        let mut connection = bus.commands.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(refused_or_unreachable(config, "ping"))?;
        Ok(bus)
    }

    pub(super) async fn append(&self, append: Append<'_>) -> Result<Published, BusError> {
        let mut invocation = self.publish_script.prepare_invoke();
        for (endpoint, _) in append.endpoints {
            invocation.key(stream_key(&self.prefix, endpoint));
        }
        invocation
            .key(published_key(&self.prefix))
            .key(last_ids_key(&self.prefix))
            .arg(format!("{}/{}", append.topic, append.partition))
            .arg(append.offset);
        match (append.kind, append.filter_key) {
            (AppendKind::Skipped, _) => invocation.arg("s").arg(""),
            (AppendKind::Record, Some(key)) => invocation.arg("1").arg(key),
            (AppendKind::Record, None) => invocation.arg("0").arg(""),
        };
        invocation.arg(append.body);
        for (_, retention) in append.endpoints {
            invocation
                .arg(retention.max_records)
                .arg(retention.max_age_secs.saturating_mul(1000));
        }
        let mut connection = self.commands.clone();
        let appended: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error("publish"))?;
        Ok(if appended == 1 {
            Published::Appended
        } else {
            Published::Duplicate
        })
    }

    pub(super) async fn ping(&self) -> Result<(), BusError> {
        let mut connection = self.commands.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(redis_error("ping"))
    }

    async fn last_id(&self, key: &str) -> Result<StreamId, BusError> {
        let mut connection = self.commands.clone();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(redis_error("read last id"))?;
        Ok(raw_entries(reply)?
            .first()
            .map_or(StreamId::ZERO, |(id, _)| *id))
    }

    pub(super) async fn range(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
        until: StreamId,
        count: usize,
    ) -> Result<Vec<BusEntry>, BusError> {
        let mut connection = self.commands.clone();
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream_key(&self.prefix, endpoint))
            .arg(format!("({after}"))
            .arg(until.to_string())
            .arg("COUNT")
            .arg(count)
            .query_async(&mut connection)
            .await
            .map_err(redis_error("replay"))?;
        Ok(raw_entries(reply)?
            .into_iter()
            .map(|(id, fields)| decode(id, fields))
            .collect())
    }

    pub(super) async fn trimmed_after(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
    ) -> Result<Option<StreamId>, BusError> {
        let key = stream_key(&self.prefix, endpoint);
        let mut connection = self.commands.clone();
        let oldest: Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(redis_error("read oldest entry"))?;
        if let Some(oldest) = raw_entries(oldest)?
            .into_iter()
            .next()
            .map(|(id, fields)| decode(id, fields))
        {
            return Ok((oldest.id > after && oldest.previous > after).then_some(oldest.id));
        }
        // Everything expired: a gap if anything was ever added after `after`.
        let last: Option<String> = redis::cmd("HGET")
            .arg(last_ids_key(&self.prefix))
            .arg(&key)
            .query_async(&mut connection)
            .await
            .map_err(redis_error("read last id"))?;
        let last = last
            .map(|id| parse_id(&id))
            .transpose()?
            .unwrap_or(StreamId::ZERO);
        Ok((last > after).then_some(StreamId::ZERO))
    }

    pub(super) async fn reader(
        &self,
        endpoints: Vec<EndpointName>,
    ) -> Result<RedisReader, BusError> {
        let keys: Vec<String> = endpoints
            .iter()
            .map(|e| stream_key(&self.prefix, e))
            .collect();
        let mut cursors = Vec::with_capacity(keys.len());
        for key in &keys {
            cursors.push(self.last_id(key).await?);
        }
        Ok(RedisReader {
            client: self.client.clone(),
            connection: None,
            keys,
            cursors,
        })
    }
}

/// A reply Fjord cannot read as Redis documents it.
fn unexpected(what: &str) -> BusError {
    BusError::Protocol {
        operation: "read",
        detail: format!("expected {what}"),
    }
}

/// The bytes of a string reply.
fn bytes_of(value: Value) -> Result<Bytes, BusError> {
    match value {
        Value::BulkString(bytes) => Ok(Bytes::from(bytes)),
        Value::SimpleString(text) => Ok(Bytes::from(text)),
        _ => Err(unexpected("a string")),
    }
}

/// The items of an array reply; nothing for nil.
fn items_of(value: Value) -> Result<Vec<Value>, BusError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(unexpected("an array")),
    }
}

/// An entry's id and fields (name, value), as Redis holds them.
type RawEntry = (StreamId, Vec<(Bytes, Bytes)>);

/// The entries of an `XRANGE` reply, or of one stream in an `XREAD` reply, as ids with their
/// fields (name, value) in order. Read from the reply as it is, not through the client's
/// typed replies, which need UTF-8 field names and keep one value per name: one entry that
/// someone else wrote must not make the whole reply unreadable.
fn raw_entries(reply: Value) -> Result<Vec<RawEntry>, BusError> {
    items_of(reply)?
        .into_iter()
        .map(|entry| {
            let mut parts = items_of(entry)?.into_iter();
            let (Some(id), fields, None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(unexpected("an entry of an id and its fields"));
            };
            let id = parse_id(&String::from_utf8_lossy(&bytes_of(id)?))?;
            let fields = match fields {
                Some(Value::Map(pairs)) => pairs,
                other => {
                    let mut flat = items_of(other.unwrap_or(Value::Nil))?.into_iter();
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    while let Some(name) = flat.next() {
                        pairs.push((name, flat.next().unwrap_or(Value::Nil)));
                    }
                    pairs
                }
            };
            let fields = fields
                .into_iter()
                // A field without a value cannot come from Redis; it counts as absent.
                .filter(|(_, value)| *value != Value::Nil)
                .map(|(name, value)| Ok((bytes_of(name)?, bytes_of(value)?)))
                .collect::<Result<_, BusError>>()?;
            Ok((id, fields))
        })
        .collect()
}

/// The streams of an `XREAD` reply, as (key, reply of its entries); nothing when it timed out.
fn streams_of(reply: Value) -> Result<Vec<(Bytes, Value)>, BusError> {
    if let Value::Map(streams) = reply {
        return streams
            .into_iter()
            .map(|(key, entries)| Ok((bytes_of(key)?, entries)))
            .collect();
    }
    items_of(reply)?
        .into_iter()
        .map(|stream| {
            let mut parts = items_of(stream)?.into_iter();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(key), Some(entries), None) => Ok((bytes_of(key)?, entries)),
                _ => Err(unexpected("a stream of a key and its entries")),
            }
        })
        .collect()
}

fn parse_id(id: &str) -> Result<StreamId, BusError> {
    id.parse()
        .map_err(|error: super::BadStreamId| BusError::Protocol {
            operation: "read",
            detail: error.to_string(),
        })
}

/// Reads endpoint streams with blocking `XREAD` on a connection of its own.
pub struct RedisReader {
    client: Client,
    connection: Option<MultiplexedConnection>,
    keys: Vec<String>,
    pub(super) cursors: Vec<StreamId>,
}

impl std::fmt::Debug for RedisReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisReader")
            .field("keys", &self.keys)
            .field("cursors", &self.cursors)
            .finish_non_exhaustive()
    }
}

impl RedisReader {
    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, BusError> {
        if self.connection.is_none() {
            // A blocking read must not share a connection with other commands, and needs
            // a response timeout longer than its block.
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(READ_BLOCK + RESPONSE_TIMEOUT));
            let connection = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(redis_error("connect reader"))?;
            self.connection = Some(connection);
        }
        self.connection.as_mut().ok_or(BusError::Protocol {
            operation: "connect reader",
            detail: "no connection".into(),
        })
    }

    pub(super) async fn next_batch(&mut self) -> Result<Vec<(usize, BusEntry)>, BusError> {
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis().to_string())
            .arg("STREAMS")
            .arg(&self.keys);
        for cursor in &self.cursors {
            command.arg(cursor.to_string());
        }
        let connection = self.connection().await?;
        let reply: Value = match command.query_async(connection).await {
            Ok(reply) => reply,
            Err(source) => {
                // Start over on a fresh connection; the cursors stay where they were.
                self.connection = None;
                return Err(BusError::Redis {
                    operation: "read",
                    source,
                });
            }
        };
        // Read whole before any cursor moves: a reply that cannot be read is read again.
        let mut streams = Vec::new();
        for (key, entries) in streams_of(reply)? {
            let Some(index) = self.keys.iter().position(|k| k.as_bytes() == key) else {
                continue;
            };
            streams.push((index, raw_entries(entries)?));
        }
        let mut batch = Vec::new();
        for (index, entries) in streams {
            for (id, fields) in entries {
                self.cursors[index] = id;
                batch.push((index, decode(id, fields)));
            }
        }
        Ok(batch)
    }
}
