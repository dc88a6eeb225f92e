//! The bus on Redis Streams, on one Redis or a Redis Cluster. Each endpoint owns three keys
//! under its own hash tag `{<prefix>:<endpoint>}`: its stream, trimmed to the endpoint's
//! retention by count and age; a hash of the highest offset published to it per topic
//! partition, which makes publishing idempotent per endpoint; and the stream's last id, for
//! telling trimmed records (a gap) apart. A table endpoint has three more for its rows
//! (see [`PUBLISH_SCRIPT`]). One tag per endpoint puts an endpoint's keys in one
//! slot, so the publish script may touch them atomically, while a cluster spreads endpoints
//! over its shards. Streams and ids survive a Redis restart when Redis persists (AOF),
//! which resuming depends on.
//!
//! Servers read each endpoint's stream with a blocking `XREAD` on a connection of its own,
//! to the node that serves the stream: its primary, or in a cluster that reads from
//! replicas, one of its replicas. With `redis.commit_after_replicas` a publish returns only
//! once `WAIT` says that many replicas hold it.

use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisFuture,
    Script, Value,
};

use super::entry::decode;
use super::{
    Append, AppendKind, BusEntry, BusError, READ_BATCH, StreamId, report_table_full, row_entry,
};
use fjord_config::{EndpointName, Keeping, ReadFrom, RedisConfig, ReplicaAcks, TableBounds};

/// How long one blocking read waits for new entries.
const READ_BLOCK: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Appends a batch of entries (records, or a marker of skipped records) of one partition to
/// one endpoint's stream, skipping those whose offset the endpoint already holds; then
/// records the last offset appended. Atomic, so a crash cannot leave half a batch.
/// Each entry carries the id of the entry before it (`p`): retention trims from the head,
/// so the oldest kept entry's `p` tells exactly whether anything after a client's last id
/// was trimmed. The last id is kept apart, as the stream may be empty.
///
/// A table endpoint also keeps its rows, in the same step as the stream: per key, the id
/// and envelope of its latest record (`<id> <envelope>`, in a hash), the keys in a sorted
/// set of equal scores (read in bytewise order, page after page, without repeats), and the
/// bytes they hold. A tombstone deletes its key. A new key past the table's bounds is not
/// made a row, and counted as refused.
///
/// KEYS: the stream, the published-offsets hash, the last-id string, the rows hash, the
/// row keys' sorted set, the rows' bytes.
/// ARGV: "topic/partition", the stream's max records, its max age in milliseconds, the
/// table's max keys (0 for a stream endpoint) and max bytes, then per entry: offset, kind
/// ("1" keyed record, "t" keyed tombstone, "0" record without a key, "s" skipped-records
/// marker, stored with a field `s`), key, envelope or marker. Returns how many entries it
/// appended and how many rows it refused.
const PUBLISH_SCRIPT: &str = r"
local stream, published, last_id = KEYS[1], KEYS[2], KEYS[3]
local rows, row_keys, row_bytes = KEYS[4], KEYS[5], KEYS[6]
local done_text = redis.call('HGET', published, ARGV[1])
local done = tonumber(done_text or '-1')
local previous = redis.call('GET', last_id) or '0-0'
local max_keys, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local keys_held, bytes_held = 0, 0
if max_keys > 0 then
  keys_held = redis.call('HLEN', rows)
  bytes_held = tonumber(redis.call('GET', row_bytes) or '0')
end
local appended, refused = 0, 0
for i = 6, #ARGV, 4 do
  local offset = tonumber(ARGV[i])
  if offset > done then
    local kind, key, body = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local keyed = kind == '1' or kind == 't'
    if keyed then
      previous = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*', 'e', body, 'p', previous, 'k', key)
    elseif kind == 's' then
      previous = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*', 'e', body, 'p', previous, 's', '1')
    else
      previous = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*', 'e', body, 'p', previous)
    end
    if max_keys > 0 and keyed then
      local old = redis.call('HSTRLEN', rows, key)
      if kind == 't' then
        if old > 0 then
          redis.call('HDEL', rows, key)
          redis.call('ZREM', row_keys, key)
          keys_held, bytes_held = keys_held - 1, bytes_held - #key - old
        end
      else
        local row = previous .. ' ' .. body
        if old > 0 then
          redis.call('HSET', rows, key, row)
          bytes_held = bytes_held - old + #row
        elseif keys_held < max_keys and bytes_held + #key + #row <= max_bytes then
          redis.call('HSET', rows, key, row)
          redis.call('ZADD', row_keys, 0, key)
          keys_held, bytes_held = keys_held + 1, bytes_held + #key + #row
        else
          refused = refused + 1
        end
      end
    end
    done, done_text = offset, ARGV[i]
    appended = appended + 1
  end
end
if appended > 0 then
  redis.call('SET', last_id, previous)
  redis.call('HSET', published, ARGV[1], done_text)
  if max_keys > 0 then
    redis.call('SET', row_bytes, bytes_held)
  end
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local max_age_ms = tonumber(ARGV[3])
  if now_ms > max_age_ms then
    redis.call('XTRIM', stream, 'MINID', '~', now_ms - max_age_ms)
  end
end
return {appended, refused}
";

/// A page of a table endpoint's rows: up to ARGV[2] keys after ARGV[1] (a `ZRANGEBYLEX`
/// bound: `-` for the first, `(key` after a key) and their rows, as key, row, key, row.
/// One script, so that every key listed has its row.
///
/// KEYS: the rows hash, the row keys' sorted set.
const ROWS_SCRIPT: &str = r"
local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
if #keys == 0 then
  return {}
end
local rows = redis.call('HMGET', KEYS[1], unpack(keys))
local page = {}
for i = 1, #keys do
  if rows[i] then
    page[#page + 1] = keys[i]
    page[#page + 1] = rows[i]
  end
end
return page
";

/// The Redis bus.
#[derive(Clone)]
pub struct RedisBus {
    commands: Commands,
    nodes: Nodes,
    prefix: String,
    publish_script: Script,
    rows_script: Script,
    replica_acks: Option<ReplicaAcks>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The connection that commands other than blocking reads share: one Redis, or every node
/// of a cluster, each command routed to the node serving its key.
#[derive(Clone)]
enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Where the blocking reads of a stream connect.
#[derive(Clone)]
enum Nodes {
    /// The one Redis.
    Single(Client),
    /// The node the cluster says serves the stream's slot; `template` holds how to reach
    /// any node (TLS, user, password), its address replaced by the node's.
    Cluster {
        template: ConnectionInfo,
        read_from: ReadFrom,
    },
}

fn redis_error(operation: &'static str) -> impl FnOnce(redis::RedisError) -> BusError {
    move |error| BusError::Redis { operation, error }
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
        None => BusError::Redis {
            operation,
            error: source,
        },
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

/// The hash tag of an endpoint's keys: one slot per endpoint.
fn tag(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{{{prefix}:{endpoint}}}")
}

/// The key of an endpoint's stream.
pub fn stream_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:stream", tag(prefix, endpoint))
}

fn published_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:published", tag(prefix, endpoint))
}

fn last_id_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:last-id", tag(prefix, endpoint))
}

fn rows_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:rows", tag(prefix, endpoint))
}

fn row_keys_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:row-keys", tag(prefix, endpoint))
}

fn row_bytes_key(prefix: &str, endpoint: &EndpointName) -> String {
    format!("{}:row-bytes", tag(prefix, endpoint))
}

/// The manifest's URLs as connection settings, with the user and the password applied.
fn connection_infos(config: &RedisConfig) -> Result<Vec<ConnectionInfo>, BusError> {
    let password = config
        .password_env
        .as_ref()
        .map(fjord_config::Secret::read)
        .transpose()?;
    let seeds = config.cluster.iter().flat_map(|cluster| &cluster.seed_urls);
    std::iter::once(&config.url)
        .chain(seeds)
        .map(|url| {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(refused_or_unreachable(config, "parse url"))?;
            let mut settings = info.redis_settings().clone();
            if let Some(username) = &config.username {
                settings = settings.set_username(username);
            }
            if let Some(password) = &password {
                settings = settings.set_password(password);
            }
            Ok(info.set_redis_settings(settings))
        })
        .collect()
}

impl RedisBus {
    /// Connects to the Redis (or the Redis Cluster) the manifest names, as its ACL user with
    /// the password from the environment, over TLS for `rediss://`, and checks that Redis
    /// accepts commands.
    pub async fn connect(config: &RedisConfig) -> Result<Self, BusError> {
        // The workspace builds rustls with two crypto providers, and rustls then refuses to
        // pick one for the redis client's TLS config; an error means one is already set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut infos = connection_infos(config)?;
        // A WAIT holds its reply for up to its own timeout.
        let response_timeout = RESPONSE_TIMEOUT
            + config.commit_after_replicas.map_or(Duration::ZERO, |acks| {
                Duration::from_millis(acks.timeout_ms)
            });
        let (commands, nodes) = match &config.cluster {
            None => {
                let info = infos.swap_remove(0);
                let client = Client::open(info).map_err(refused_or_unreachable(config, "open"))?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(2);
                let commands = match client
                    .get_connection_manager_with_config(manager_config)
                    .await
                {
                    Ok(commands) => commands,
                    Err(error) => return Err(connect_failure(config, &client, error).await),
                };
                (Commands::Single(commands), Nodes::Single(client))
            }
            Some(cluster) => {
                let template = infos[0].clone();
                let client = ClusterClient::builder(infos)
                    .build()
                    .map_err(refused_or_unreachable(config, "open"))?;
                let cluster_config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout);
                let commands = match client
                    .get_async_connection_with_config(cluster_config)
                    .await
                {
                    Ok(commands) => commands,
                    Err(error) => {
                        let seed = Client::open(template.clone())
                            .map_err(refused_or_unreachable(config, "open"))?;
                        return Err(connect_failure(config, &seed, error).await);
                    }
                };
                let nodes = Nodes::Cluster {
                    template,
                    read_from: cluster.read_from,
                };
                (Commands::Cluster(commands), nodes)
            }
        };
        let bus = Self {
            commands,
            nodes,
            prefix: config.key_prefix.clone(),
            publish_script: Script::new(PUBLISH_SCRIPT),
            rows_script: Script::new(ROWS_SCRIPT),
            replica_acks: config.commit_after_replicas,
        };
        // Without a password the connection succeeds and only commands fail (NOAUTH).
        let mut connection = bus.commands.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(refused_or_unreachable(config, "ping"))?;
        Ok(bus)
    }

    /// Appends `append`'s entries to each endpoint's stream, the endpoints side by side;
    /// then, if the manifest asks, waits until enough replicas hold them. Returns how many
    /// entries were new, over all endpoints.
    pub(super) async fn append(&self, append: &Append<'_>) -> Result<usize, BusError> {
        let appended = futures_util::future::try_join_all(
            append
                .endpoints
                .iter()
                .map(|(endpoint, keeping)| self.append_to(endpoint, *keeping, append)),
        )
        .await?;
        if let Some(acks) = self.replica_acks {
            // Every earlier write on the connection counts, so a batch found already
            // published (written before a crash, say) is waited for too.
            let mut connection = self.commands.clone();
            let acknowledged: u32 = redis::cmd("WAIT")
                .arg(acks.count)
                .arg(acks.timeout_ms)
                .query_async(&mut connection)
                .await
                .map_err(redis_error("wait for replicas"))?;
            if acknowledged < acks.count {
                return Err(BusError::NotReplicated {
                    acknowledged,
                    wanted: acks.count,
                });
            }
        }
        Ok(appended.into_iter().sum())
    }

    async fn append_to(
        &self,
        endpoint: &EndpointName,
        keeping: Keeping,
        append: &Append<'_>,
    ) -> Result<usize, BusError> {
        let retention = keeping.retention;
        let table = keeping.table.unwrap_or(TableBounds {
            max_keys: 0,
            max_bytes: 0,
        });
        let mut invocation = self.publish_script.prepare_invoke();
        invocation
            .key(stream_key(&self.prefix, endpoint))
            .key(published_key(&self.prefix, endpoint))
            .key(last_id_key(&self.prefix, endpoint))
            .key(rows_key(&self.prefix, endpoint))
            .key(row_keys_key(&self.prefix, endpoint))
            .key(row_bytes_key(&self.prefix, endpoint))
            .arg(format!("{}/{}", append.topic, append.partition))
            .arg(retention.max_records)
            .arg(retention.max_age_secs.saturating_mul(1000))
            .arg(table.max_keys)
            .arg(table.max_bytes);
        for entry in &append.entries {
            invocation.arg(entry.offset);
            match (entry.kind, entry.filter_key) {
                (AppendKind::Skipped, _) => invocation.arg("s").arg(""),
                (AppendKind::Record, Some(key)) => invocation.arg("1").arg(key),
                (AppendKind::Tombstone, Some(key)) => invocation.arg("t").arg(key),
                (AppendKind::Record | AppendKind::Tombstone, None) => invocation.arg("0").arg(""),
            };
            invocation.arg(entry.body);
        }
        let mut connection = self.commands.clone();
        let (appended, refused): (usize, usize) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error("publish"))?;
        report_table_full(endpoint, refused);
        Ok(appended)
    }

    pub(super) async fn rows(
        &self,
        endpoint: &EndpointName,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<Vec<BusEntry>, BusError> {
        let after = after.map_or_else(|| b"-".to_vec(), |key| [b"(".as_slice(), key].concat());
        let mut connection = self.commands.clone();
        let page: Vec<Vec<u8>> = self
            .rows_script
            .key(rows_key(&self.prefix, endpoint))
            .key(row_keys_key(&self.prefix, endpoint))
            .arg(after)
            .arg(count)
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error("read rows"))?;
        let mut rows = Vec::with_capacity(page.len() / 2);
        let mut page = page.into_iter();
        while let (Some(key), Some(row)) = (page.next(), page.next()) {
            let row = Bytes::from(row);
            // `<id> <envelope>`; a row someone else wrote otherwise is decoded as invalid.
            let (id, envelope) = match row.iter().position(|&b| b == b' ') {
                Some(split) => (
                    std::str::from_utf8(&row[..split])
                        .ok()
                        .and_then(|id| id.parse().ok())
                        .unwrap_or(StreamId::ZERO),
                    row.slice(split + 1..),
                ),
                None => (StreamId::ZERO, row),
            };
            rows.push(row_entry(id, Bytes::from(key), envelope));
        }
        Ok(rows)
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
        // From the primary: a replica may lag behind `until`, which the live reads reached.
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
        let mut connection = self.commands.clone();
        let oldest: Value = redis::cmd("XRANGE")
            .arg(stream_key(&self.prefix, endpoint))
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
        let last: Option<String> = redis::cmd("GET")
            .arg(last_id_key(&self.prefix, endpoint))
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
            bus: self.clone(),
            connections: vec![None; keys.len()],
            reading: vec![false; keys.len()],
            reads: FuturesUnordered::new(),
            keys,
            cursors,
        })
    }

    /// A connection of its own for blocking reads of `key`, to the node that serves it.
    async fn read_connection(&self, key: &str) -> Result<MultiplexedConnection, BusError> {
        // A blocking read must not share a connection with other commands, and needs a
        // response timeout longer than its block.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(READ_BLOCK + RESPONSE_TIMEOUT));
        let (template, read_from) = match &self.nodes {
            Nodes::Single(client) => {
                return client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(redis_error("connect reader"));
            }
            Nodes::Cluster {
                template,
                read_from,
            } => (template, *read_from),
        };
        let (primary, replicas) = self.nodes_of(key).await?;
        let mut candidates = Vec::new();
        if read_from == ReadFrom::Replica {
            candidates.extend(replicas.into_iter().map(|node| (node, true)));
            fastrand::shuffle(&mut candidates);
        }
        candidates.push((primary, false));
        let mut last_error = None;
        for ((host, port), replica) in candidates {
            // A node that does not know its own address (one alone, say) says "" or "?":
            // it is the node the seed URL reaches.
            let host = if host.is_empty() || host == "?" {
                match template.addr() {
                    ConnectionAddr::Tcp(seed, _) | ConnectionAddr::TcpTls { host: seed, .. } => {
                        seed.clone()
                    }
                    _ => host,
                }
            } else {
                host
            };
            let addr = match template.addr() {
                ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                },
                _ => ConnectionAddr::Tcp(host, port),
            };
            let attempt = async {
                let client = Client::open(template.clone().set_addr(addr))?;
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                if replica {
                    redis::cmd("READONLY")
                        .query_async::<()>(&mut connection)
                        .await?;
                }
                Ok::<_, redis::RedisError>(connection)
            };
            match attempt.await {
                Ok(connection) => return Ok(connection),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.map_or_else(
            || unexpected("a node serving the stream"),
            redis_error("connect reader"),
        ))
    }

    /// The primary and the replicas that serve `key`'s slot, as the cluster says now.
    async fn nodes_of(&self, key: &str) -> Result<((String, u16), Vec<(String, u16)>), BusError> {
        let mut connection = self.commands.clone();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut connection)
            .await
            .map_err(redis_error("find slot"))?;
        let ranges: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await
            .map_err(redis_error("read cluster slots"))?;
        for range in items_of(ranges)? {
            let mut parts = items_of(range)?.into_iter();
            let (Some(Value::Int(first)), Some(Value::Int(last))) = (parts.next(), parts.next())
            else {
                return Err(unexpected("a slot range"));
            };
            if !(first..=last).contains(&slot) {
                continue;
            }
            let mut nodes = parts.map(node_address);
            let primary = nodes.next().ok_or_else(|| unexpected("a primary"))??;
            let replicas = nodes.collect::<Result<_, _>>()?;
            return Ok((primary, replicas));
        }
        Err(unexpected("a node serving the stream's slot"))
    }
}

/// A node of a `CLUSTER SLOTS` reply, as host and port.
fn node_address(node: Value) -> Result<(String, u16), BusError> {
    let mut fields = items_of(node)?.into_iter();
    match (fields.next(), fields.next()) {
        (Some(host), Some(Value::Int(port))) => {
            let host = String::from_utf8_lossy(&bytes_of(host)?).into_owned();
            let port = u16::try_from(port).map_err(|_| unexpected("a port"))?;
            Ok((host, port))
        }
        _ => Err(unexpected("a node of host and port")),
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

/// A blocking read of one endpoint's stream, as (index of the endpoint, reply).
type Read = BoxFuture<'static, (usize, Result<Value, redis::RedisError>)>;

/// Reads endpoint streams, each with blocking `XREAD`s on a connection of its own to the
/// node that serves it. A read left waiting when [`RedisReader::next_batch`] returns stays
/// in flight for the next call, so no reply is dropped and no connection has two reads.
pub struct RedisReader {
    bus: RedisBus,
    keys: Vec<String>,
    pub(super) cursors: Vec<StreamId>,
    connections: Vec<Option<MultiplexedConnection>>,
    reading: Vec<bool>,
    reads: FuturesUnordered<Read>,
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
    /// Starts a read of every stream that has none in flight.
    async fn start_reads(&mut self) -> Result<(), BusError> {
        for index in 0..self.keys.len() {
            if self.reading[index] {
                continue;
            }
            let mut connection = match &self.connections[index] {
                Some(connection) => connection.clone(),
                None => {
                    let connection = self.bus.read_connection(&self.keys[index]).await?;
                    self.connections[index] = Some(connection.clone());
                    connection
                }
            };
            let mut command = redis::cmd("XREAD");
            command
                .arg("COUNT")
                .arg(READ_BATCH)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis().to_string())
                .arg("STREAMS")
                .arg(&self.keys[index])
                .arg(self.cursors[index].to_string());
            self.reads.push(Box::pin(async move {
                (index, command.query_async(&mut connection).await)
            }));
            self.reading[index] = true;
        }
        Ok(())
    }

    pub(super) async fn next_batch(&mut self) -> Result<Vec<(usize, BusEntry)>, BusError> {
        self.start_reads().await?;
        let Some(first) = self.reads.next().await else {
            // No endpoints: nothing will come.
            tokio::time::sleep(READ_BLOCK).await;
            return Ok(Vec::new());
        };
        let mut replies = vec![first];
        while let Some(Some(reply)) = self.reads.next().now_or_never() {
            replies.push(reply);
        }
        // Read every reply whole before any cursor moves: on a failure, all are read again.
        let mut streams = Vec::new();
        let mut failure = None;
        for (index, reply) in replies {
            self.reading[index] = false;
            let entries = reply.map_err(redis_error("read")).and_then(|reply| {
                streams_of(reply)?
                    .into_iter()
                    .map(|(_, entries)| raw_entries(entries))
                    .collect::<Result<Vec<_>, _>>()
            });
            match entries {
                Ok(entries) => streams.push((index, entries.into_iter().flatten())),
                Err(error) => {
                    // Start over on a fresh connection, to the node that serves the stream
                    // now (a failover moves it); the cursor stays where it was.
                    self.connections[index] = None;
                    failure = Some(error);
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
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
