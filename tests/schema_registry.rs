//! Avro, Protobuf and JSON Schema records through a real Schema Registry (Apicurio's, with
//! the Confluent API, started by `ci/services/schema-registry.sh`), real Kafka and Redis:
//! records produced by confluent-kafka's own serializers reach SSE clients as JSON; records
//! that cannot be decoded become `fjord.gap` events and the partition moves on; a registry
//! that is down holds the partition back until it answers again; `fjord types` output
//! type-checks (client/e2e/typed/page.ts, `tsc`) the records an SSE client receives.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Held by the tests whose `fjord dev` writes topic `orders`: they share the registry's
/// subject `orders-value`, and Apicurio refuses one of two writers that create a subject at
/// the same moment (a 5xx, then 409 "already exists" on the retry).
static ORDERS_VALUE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The registry and the venv with the producers, started and installed when missing.
struct Registry {
    url: String,
    python: String,
}

fn registry() -> Registry {
    // `up` is idempotent: a running registry is only checked.
    let script = repo_root().join("ci/services/schema-registry.sh");
    let output = Command::new(script)
        .arg("up")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ci/services/schema-registry.sh up failed"
    );
    let env_file = String::from_utf8(output.stdout).unwrap();
    let env = std::fs::read_to_string(env_file.trim()).unwrap();
    let value = |name: &str| {
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("{name} is not in {env_file}"))
            .trim_matches('\'')
            .to_owned()
    };
    Registry {
        url: value("FJORD_TEST_SCHEMA_REGISTRY_URL"),
        python: value("FJORD_TEST_SCHEMA_REGISTRY_PYTHON"),
    }
}

/// Produces `records` to partition 0 of `topic` with tests/schema_registry/produce.py (see
/// there for their form); returns their offsets.
fn produce_serialized(
    registry: &Registry,
    brokers: &str,
    topic: &str,
    records: &serde_json::Value,
) -> Vec<i64> {
    use std::io::Write as _;
    let script = repo_root().join("tests/schema_registry/produce.py");
    let mut child = Command::new(&registry.python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let job = serde_json::json!({
        "brokers": brokers, "registry": registry.url, "topic": topic, "records": records
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "produce.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A server and a consumer for one endpoint per topic (named as the topic), each topic read
/// with its `formats`, the registry at `registry_url`; and an SSE client per endpoint,
/// connected before anything is produced.
struct Pipeline {
    port: u16,
    manifest: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _server: Process,
    consumer: Process,
    clients: Vec<SseStream>,
}

async fn pipeline(registry_url: &str, topics: &[(&str, serde_json::Value)]) -> Pipeline {
    let named: Vec<(&str, &str, serde_json::Value)> = topics
        .iter()
        .map(|(topic, formats)| (*topic, *topic, formats.clone()))
        .collect();
    named_pipeline(registry_url, &named).await
}

/// [`pipeline`] with endpoints named apart from their topics: `(endpoint, topic, formats)`.
async fn named_pipeline(
    registry_url: &str,
    endpoints: &[(&str, &str, serde_json::Value)],
) -> Pipeline {
    configured_pipeline(serde_json::json!({"urls": [registry_url]}), endpoints, &[]).await
}

/// [`named_pipeline`] with the manifest's `schema_registry` section as given, and `envs`
/// (its secrets) for both processes.
async fn configured_pipeline(
    schema_registry: serde_json::Value,
    endpoints: &[(&str, &str, serde_json::Value)],
    envs: &[(&str, &str)],
) -> Pipeline {
    let services = services();
    for (_, topic, _) in endpoints {
        create_topic(&services.brokers, topic, 1).await;
    }
    let port = free_port();
    let names: Vec<(&str, &str)> = endpoints.iter().map(|(e, t, _)| (*e, *t)).collect();
    let mut manifest = manifest(&services, &names, &unique("group"), port);
    manifest["topics"] = endpoints
        .iter()
        .map(|(_, topic, formats)| ((*topic).to_owned(), formats.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    manifest["schema_registry"] = schema_registry;
    let (dir, path) = write_manifest(&manifest);
    let mut server = Process::start(
        &server_binary(),
        &["--manifest", path.to_str().unwrap()],
        envs,
    );
    server.wait_ready(port).await;
    let mut clients = Vec::new();
    for (endpoint, _, _) in endpoints {
        let mut client = SseStream::connect(
            &format!("http://127.0.0.1:{port}/v1/streams/{endpoint}"),
            &[],
        )
        .await;
        assert_eq!(client.status, 200);
        client.next().await.expect("prelude");
        clients.push(client);
    }
    let consumer = Process::consumer(&path, envs);
    Pipeline {
        port,
        manifest: path,
        _dir: dir,
        _server: server,
        consumer,
        clients,
    }
}

/// An Avro record schema named after `topic` (so that no other test's schema has its
/// content, and the registry gives it an id of its own), with `extra` fields.
fn avro_order(topic: &str, extra: &[serde_json::Value]) -> String {
    let mut fields = vec![
        serde_json::json!({"name": "id", "type": {"type": "string", "logicalType": "uuid"}}),
        serde_json::json!({"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}}),
        serde_json::json!({"name": "day", "type": {"type": "int", "logicalType": "date"}}),
        serde_json::json!({"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}),
        serde_json::json!({"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}}),
        serde_json::json!({"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}}),
        serde_json::json!({"name": "note", "type": ["null", "string"], "default": null}),
        serde_json::json!({"name": "tags", "type": {"type": "map", "values": "long"}}),
        serde_json::json!({"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line",
            "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}}),
        serde_json::json!({"name": "raw", "type": {"type": "fixed", "name": "Raw", "size": 2}}),
        serde_json::json!({"name": "blob", "type": "bytes"}),
        serde_json::json!({"name": "ratio", "type": "double"}),
        serde_json::json!({"name": "paid", "type": "boolean"}),
    ];
    fields.extend(extra.iter().cloned());
    serde_json::json!({
        "type": "record", "name": "Order", "namespace": topic.replace('-', "_"), "fields": fields
    })
    .to_string()
}

fn avro_order_value(n: i64) -> serde_json::Value {
    serde_json::json!({
        "id": "8f2d6a52-6f0e-4a57-9c39-0a4c2a8f1b3e",
        "total": {"$decimal": format!("{n}.05")},
        "day": 19_723,
        "at": 1_767_323_045_678_i64,
        "at_us": 1_767_323_045_678_901_i64,
        "state": "PAID",
        "note": null,
        "tags": {"a": n, "b": 9_007_199_254_740_993_i64},
        "lines": [{"sku": "s-1", "qty": 2}],
        "raw": {"$hex": "ff00"},
        "blob": {"$hex": "6869"},
        "ratio": 0.25,
        "paid": true
    })
}

fn avro_order_json(n: i64) -> serde_json::Value {
    serde_json::json!({
        "id": "8f2d6a52-6f0e-4a57-9c39-0a4c2a8f1b3e",
        "total": format!("{n}.05"),
        "day": "2024-01-01",
        "at": "2026-01-02T03:04:05.678Z",
        "at_us": "2026-01-02T03:04:05.678901Z",
        "state": "PAID",
        "note": null,
        "tags": {"a": n, "b": 9_007_199_254_740_993_i64},
        "lines": [{"sku": "s-1", "qty": 2}],
        "raw": "/wA=",
        "blob": "aGk=",
        "ratio": 0.25,
        "paid": true
    })
}

#[tokio::test]
async fn avro_protobuf_and_json_schema_records_arrive_as_json() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let (avro, proto, json, auto) = (
        unique("sr-avro"),
        unique("sr-proto"),
        unique("sr-json"),
        unique("sr-auto"),
    );
    let mut pipeline = pipeline(
        &registry.url,
        &[
            (
                &avro,
                serde_json::json!({"value_format": "avro", "key_format": "string"}),
            ),
            (&proto, serde_json::json!({"value_format": "protobuf"})),
            (&json, serde_json::json!({"value_format": "json_schema"})),
            (&auto, serde_json::json!({})),
        ],
    )
    .await;

    // Avro: two versions of one subject in one topic, the second with a field more.
    let v1 = avro_order(&avro, &[]);
    let v2 = avro_order(
        &avro,
        &[serde_json::json!({"name": "coupon", "type": ["null", "string"], "default": null})],
    );
    let mut with_coupon = avro_order_value(2);
    with_coupon["coupon"] = "SPRING".into();
    produce_serialized(
        &registry,
        &services.brokers,
        &avro,
        &serde_json::json!([
            {"format": "avro", "schema": v1, "value": avro_order_value(1), "key": "order-1"},
            {"format": "avro", "schema": v2, "value": with_coupon, "key": "order-2"},
        ]),
    );
    let events = pipeline.clients[0].records(2).await;
    let (first, second) = (events[0].json(), events[1].json());
    assert_eq!(first["value"], avro_order_json(1), "{first}");
    let mut expected = avro_order_json(2);
    expected["coupon"] = "SPRING".into();
    assert_eq!(second["value"], expected, "{second}");
    assert_eq!(first["key"], "order-1");
    let subject = format!("{avro}-value");
    assert_eq!(
        first["value_schema"]["subject"],
        subject.as_str(),
        "{first}"
    );
    assert_eq!(first["value_schema"]["version"], 1);
    assert_eq!(second["value_schema"]["subject"], subject.as_str());
    assert_eq!(second["value_schema"]["version"], 2);
    assert_ne!(first["value_schema"]["id"], second["value_schema"]["id"]);
    assert_eq!(first.get("key_schema"), None);

    // Protobuf: registered by the serializer as descriptors with a reference (Money), top
    // level and nested messages (message indexes [0], [1], [0, 0]); and as .proto text.
    produce_serialized(
        &registry,
        &services.brokers,
        &proto,
        &serde_json::json!([
            {"format": "protobuf", "message": "shop.Order", "value": {
                "id": "o-1", "total": {"currency": "EUR", "units": "1250"}, "tags": ["a", "b"],
                "status": "PAID", "lines": [{"sku": "s-1", "qty": 2}]}},
            {"format": "protobuf", "message": "shop.Shipment", "value": {"order_id": "o-1", "boxes": 3}},
            {"format": "protobuf", "message": "shop.Order.Line", "value": {"sku": "s-2"}},
            {"format": "proto_text", "subject": format!("{proto}-ping"), "value": {"note": "hi", "n": "3"}},
        ]),
    );
    let values: Vec<serde_json::Value> = pipeline.clients[1]
        .records(4)
        .await
        .iter()
        .map(|event| event.json()["value"].clone())
        .collect();
    assert_eq!(
        values,
        [
            serde_json::json!({"id": "o-1", "total": {"currency": "EUR", "units": "1250"},
                "tags": ["a", "b"], "status": "PAID", "lines": [{"sku": "s-1", "qty": 2}]}),
            serde_json::json!({"order_id": "o-1", "boxes": 3}),
            serde_json::json!({"sku": "s-2", "qty": 0}),
            serde_json::json!({"note": "hi", "n": "3"}),
        ]
    );

    // JSON Schema: the header stripped.
    let schema = serde_json::json!({"title": json, "type": "object",
        "properties": {"k": {"type": "string"}, "n": {"type": "integer"}}});
    produce_serialized(
        &registry,
        &services.brokers,
        &json,
        &serde_json::json!([
            {"format": "json_schema", "schema": schema.to_string(), "value": {"k": "x", "n": 7}},
        ]),
    );
    let event = pipeline.clients[2].records(1).await[0].json();
    assert_eq!(event["value"], serde_json::json!({"k": "x", "n": 7}));
    assert!(event["value_schema"]["id"].is_u64(), "{event}");

    // auto: the wire format with a known id is decoded; anything else as before.
    let unknown_id = [0_u8, 0x7f, 0xff, 0xff, 0x01, b'x'];
    produce_serialized(
        &registry,
        &services.brokers,
        &auto,
        &serde_json::json!([
            {"format": "raw", "hex": hex(br#"{"plain": true}"#)},
            {"format": "avro", "schema": v1, "value": avro_order_value(3)},
            {"format": "raw", "hex": hex(&unknown_id)},
        ]),
    );
    let values: Vec<serde_json::Value> = pipeline.clients[3]
        .records(3)
        .await
        .iter()
        .map(|event| event.json()["value"].clone())
        .collect();
    assert_eq!(
        values,
        [
            serde_json::json!({"plain": true}),
            avro_order_json(3),
            serde_json::json!({"base64": BASE64.encode(unknown_id)}),
        ]
    );
    drop(pipeline.consumer);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `fjord.gap` events and records of `client`, until `count` of them arrived.
async fn next_events(
    client: &mut SseStream,
    count: usize,
) -> Vec<(Option<String>, serde_json::Value)> {
    client
        .records(count)
        .await
        .into_iter()
        .map(|event| (event.event.clone(), event.json()))
        .collect()
}

#[tokio::test]
async fn undecodable_records_are_skipped_with_a_gap_and_the_partition_moves_on() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let topic = unique("sr-bad");
    let proto_topic = unique("sr-bad-proto");
    let mut pipeline = pipeline(
        &registry.url,
        &[
            (&topic, serde_json::json!({"value_format": "avro"})),
            (
                &proto_topic,
                serde_json::json!({"value_format": "protobuf"}),
            ),
        ],
    )
    .await;
    let schema = avro_order(&topic, &[]);
    let offsets = produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([
            {"format": "avro", "schema": schema, "value": avro_order_value(1)},
            // An id the registry does not know.
            {"format": "raw", "hex": hex(&[0, 0x7f, 0xff, 0xff, 0x02, 2])},
            // A known id, then bytes that are not Avro of its schema.
            {"format": "avro", "schema": schema, "value": avro_order_value(2), "corrupt": true},
            // Not in the wire format at all.
            {"format": "raw", "hex": hex(br#"{"a": 1}"#)},
            // A schema of another format (JSON Schema) for an Avro topic.
            {"format": "json_schema", "schema": serde_json::json!({"title": topic, "type": "object",
                "properties": {"a": {"type": "integer"}}}).to_string(),
                "subject": format!("{topic}-json"), "value": {"a": 1}},
            {"format": "avro", "schema": schema, "value": avro_order_value(3)},
        ]),
    );
    assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
    let events = next_events(&mut pipeline.clients[0], 6).await;
    assert_eq!(events[0].0.as_deref(), Some(topic.as_str()));
    assert_eq!(events[0].1["value"], avro_order_json(1));
    for (offset, expected_error) in [
        (1, "schema"),
        (2, "not Avro of schema"),
        (3, "not in the Confluent wire format"),
        (4, "is not of the topic's format"),
    ] {
        let (event, gap) = &events[usize::try_from(offset).unwrap()];
        assert_eq!(event.as_deref(), Some("fjord.gap"), "{gap}");
        assert_eq!(gap["reason"], "undecodable_record", "{gap}");
        assert_eq!(gap["topic"], topic.as_str());
        assert_eq!(gap["partition"], 0);
        assert_eq!(gap["first_offset"], offset);
        assert_eq!(gap["last_offset"], offset);
        assert!(
            gap["error"].as_str().unwrap().contains(expected_error),
            "{gap}"
        );
    }
    assert_eq!(events[5].1["value"], avro_order_json(3));
    assert_eq!(events[5].1["offset"], 5);
    // Four skips, one log line: logged once per interval.
    let logged = pipeline
        .consumer
        .log()
        .iter()
        .filter(|line| line.contains("skipped a record that cannot be decoded"))
        .count();
    assert_eq!(logged, 1, "{}", pipeline.consumer.log().join("\n"));

    // A schema the registry took but that does not parse (a type no file defines).
    let registered: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/subjects/{proto_topic}-value/versions", registry.url))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({"schemaType": "PROTOBUF",
            "schema": format!("syntax = \"proto3\";\nmessage M{} {{ Nowhere a = 1; }}\n", proto_topic.replace('-', "_"))}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = u32::try_from(registered["id"].as_u64().expect("an id")).unwrap();
    let mut unparsable = vec![0];
    unparsable.extend(id.to_be_bytes());
    unparsable.extend([0, 0x08, 0x01]);
    produce_serialized(
        &registry,
        &services.brokers,
        &proto_topic,
        &serde_json::json!([{"format": "raw", "hex": hex(&unparsable)}]),
    );
    let (event, gap) = &next_events(&mut pipeline.clients[1], 1).await[0];
    assert_eq!(event.as_deref(), Some("fjord.gap"), "{gap}");
    assert_eq!(gap["reason"], "undecodable_record");
    assert!(
        gap["error"].as_str().unwrap().contains("does not parse"),
        "{gap}"
    );

    // Counted: four records of one topic and one of the other, one endpoint each.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", pipeline.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nfjord_undecodable_records_total 5\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn avro_keys_are_decoded_with_their_subjects_schema() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let topic = unique("sr-key");
    let mut pipeline = pipeline(
        &registry.url,
        &[(
            &topic,
            serde_json::json!({"key_format": "avro", "value_format": "avro"}),
        )],
    )
    .await;
    let key_schema = serde_json::json!({"type": "record", "name": "OrderKey",
    "namespace": topic.replace('-', "_"), "fields": [
        {"name": "shop", "type": "string"},
        {"name": "n", "type": "long"},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}}
    ]})
    .to_string();
    produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([{"format": "avro", "schema": avro_order(&topic, &[]),
            "value": avro_order_value(3),
            "key_avro": {"schema": key_schema, "value": {"shop": "north", "n": 3, "day": 19_723}}}]),
    );
    let event = pipeline.clients[0].records(1).await[0].json();
    assert_eq!(
        event["key"],
        serde_json::json!({"shop": "north", "n": 3, "day": "2024-01-01"}),
        "{event}"
    );
    assert_eq!(event["key_schema"]["subject"], format!("{topic}-key"));
    assert_eq!(event["key_schema"]["version"], 1);
    assert_ne!(event["key_schema"]["id"], event["value_schema"]["id"]);
    assert_eq!(event["value"], avro_order_json(3));
}

#[tokio::test]
async fn a_registry_url_that_does_not_answer_is_passed_over_for_the_next() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let topic = unique("sr-urls");
    // A port nothing listens on, first.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut pipeline = configured_pipeline(
        serde_json::json!({"urls": [dead_url, registry.url]}),
        &[(&topic, &topic, serde_json::json!({"value_format": "avro"}))],
        &[],
    )
    .await;
    produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([{"format": "avro", "schema": avro_order(&topic, &[]),
            "value": avro_order_value(5)}]),
    );
    let event = pipeline.clients[0].records(1).await[0].json();
    assert_eq!(event["value"], avro_order_json(5), "{event}");
}

/// A proxy in front of the registry that answers 401 to a request without the expected
/// `Authorization` header, and counts the requests that had it. (Apicurio's own
/// authentication needs Keycloak; this checks what Fjord sends.) A request is read up to the
/// end of its head, checked, then passed on with the rest of its connection.
struct AuthProxy {
    url: String,
    authorized: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl AuthProxy {
    async fn start(upstream_url: &str, authorization: &str) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (upstream, path) = upstream_url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .unwrap();
        let upstream = upstream.to_owned();
        let expected = format!("authorization: {authorization}\r\n").to_lowercase();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://127.0.0.1:{}/{path}",
            listener.local_addr().unwrap().port()
        );
        let authorized = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&authorized);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (upstream, expected, count) =
                    (upstream.clone(), expected.clone(), Arc::clone(&count));
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0_u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match inbound.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => head.extend_from_slice(&buffer[..read]),
                        }
                    }
                    if !String::from_utf8_lossy(&head)
                        .to_lowercase()
                        .contains(&expected)
                    {
                        let _ = inbound
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await
                        && outbound.write_all(&head).await.is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            url,
            authorized,
            task,
        }
    }
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn registry_credentials_from_the_environment_are_sent() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let basic = format!("Basic {}", BASE64.encode("fjord-key:s3cret-basic"));
    for (auth, authorization, secret) in [
        (
            serde_json::json!({"type": "bearer", "token_env": "FJORD_TEST_REGISTRY_SECRET"}),
            "Bearer t0ken-bearer".to_owned(),
            "t0ken-bearer",
        ),
        (
            serde_json::json!({"type": "basic", "username": "fjord-key",
                "password_env": "FJORD_TEST_REGISTRY_SECRET"}),
            basic.clone(),
            "s3cret-basic",
        ),
    ] {
        let proxy = AuthProxy::start(&registry.url, &authorization).await;
        let topic = unique("sr-auth");
        let mut pipeline = configured_pipeline(
            serde_json::json!({"urls": [proxy.url], "auth": auth}),
            &[(&topic, &topic, serde_json::json!({"value_format": "avro"}))],
            &[("FJORD_TEST_REGISTRY_SECRET", secret)],
        )
        .await;
        produce_serialized(
            &registry,
            &services.brokers,
            &topic,
            &serde_json::json!([{"format": "avro", "schema": avro_order(&topic, &[]),
                "value": avro_order_value(7)}]),
        );
        let event = pipeline.clients[0].records(1).await[0].json();
        assert_eq!(
            event["value"],
            avro_order_json(7),
            "{authorization}: {event}"
        );
        assert!(proxy.authorized.load(Ordering::SeqCst) > 0);
        // The secret is in no log line.
        let log = pipeline.consumer.log().join("\n");
        assert!(!log.contains(secret), "{log}");
    }
}

/// A TLS proxy in front of the registry, with a certificate of a CA of its own (made by
/// `openssl`, tests/common/tls.rs): `https://` URL, and the CA's file.
struct TlsProxy {
    url: String,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(upstream_url: &str) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (upstream, path) = upstream_url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .unwrap();
        let upstream = upstream.to_owned();
        let dir = tempfile::tempdir().unwrap();
        let certificates = tls::make_certificates(dir.path(), None);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&certificates.server_cert)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(&certificates.server_key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/{path}",
            listener.local_addr().unwrap().port()
        );
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Ok(mut inbound) = acceptor.accept(inbound).await
                        && let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            url,
            ca: certificates.ca,
            _dir: dir,
            task,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_registry_over_tls_is_trusted_through_the_given_ca_file() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let proxy = TlsProxy::start(&registry.url).await;
    let topic = unique("sr-tls");
    let mut pipeline = configured_pipeline(
        serde_json::json!({"urls": [proxy.url], "ca_file": proxy.ca}),
        &[(&topic, &topic, serde_json::json!({"value_format": "avro"}))],
        &[],
    )
    .await;
    produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([{"format": "avro", "schema": avro_order(&topic, &[]),
            "value": avro_order_value(8)}]),
    );
    let event = pipeline.clients[0].records(1).await[0].json();
    assert_eq!(event["value"], avro_order_json(8), "{event}");
}

/// A TCP proxy in front of the registry that can refuse every connection, as a registry
/// that is down does.
struct Proxy {
    url: String,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream_url: &str) -> Self {
        let (upstream, path) = upstream_url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .unwrap();
        let upstream = upstream.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://127.0.0.1:{}/{path}",
            listener.local_addr().unwrap().port()
        );
        let down = Arc::new(AtomicBool::new(true));
        let is_down = Arc::clone(&down);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if is_down.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { url, down, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_registry_that_is_down_holds_the_partition_until_it_is_back() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let topic = unique("sr-down");
    let proxy = Proxy::start(&registry.url).await;
    let mut pipeline = pipeline(
        &proxy.url,
        &[(&topic, serde_json::json!({"value_format": "avro"}))],
    )
    .await;
    let schema = avro_order(&topic, &[]);
    produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([
            {"format": "avro", "schema": schema, "value": avro_order_value(1)},
            {"format": "avro", "schema": schema, "value": avro_order_value(2)},
        ]),
    );
    pipeline
        .consumer
        .wait_for_log(&[
            "schema registry unavailable",
            "holding the partition",
            "offset=0",
        ])
        .await;
    proxy.down.store(false, Ordering::SeqCst);
    let events = next_events(&mut pipeline.clients[0], 2).await;
    // Held, not skipped: both records, in order, and no gap.
    assert_eq!(events[0].0.as_deref(), Some(topic.as_str()));
    assert_eq!(events[0].1["value"], avro_order_json(1));
    assert_eq!(events[1].1["value"], avro_order_json(2));
    pipeline
        .consumer
        .wait_for_log(&["schema registry answers again"])
        .await;
}

/// Asks `/readyz` until it answers `status` with a body holding `says`.
async fn readyz_until(port: u16, status: u16, says: &str) {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            let answered = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if answered == status && body.contains(says) {
                return;
            }
            last = format!("{answered} {body}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {status} with {says:?}; last: {last}");
}

#[tokio::test]
async fn fjord_devs_readiness_says_the_registry_is_down_while_it_holds_a_record() {
    if skip_without_services() {
        return;
    }
    let _orders_value = ORDERS_VALUE.lock().await;
    let registry = registry();
    let proxy = Proxy::start(&registry.url).await;
    proxy.down.store(false, Ordering::SeqCst);
    let port = free_port();
    let port_text = port.to_string();
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &[
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            &port_text,
            "--no-demo-producer",
            "--schema-registry",
            &proxy.url,
        ],
        &[],
    );
    readyz_until(port, 200, "ready").await;
    let info: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/dev.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let brokers = info["kafka"].as_str().unwrap();
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/orders"), &[]).await;
    assert_eq!(client.status, 200);
    proxy.down.store(true, Ordering::SeqCst);
    // A schema of its own: fetched at this record, from a registry that is down.
    let schema = avro_order(&unique("dev-down"), &[]);
    produce_serialized(
        &registry,
        brokers,
        "orders",
        &serde_json::json!([{"format": "avro", "schema": schema, "value": avro_order_value(6)}]),
    );
    readyz_until(port, 503, "schema registry does not answer").await;
    proxy.down.store(false, Ordering::SeqCst);
    readyz_until(port, 200, "ready").await;
    let events = next_events(&mut client, 1).await;
    assert_eq!(events[0].1["value"], avro_order_json(6));
}

#[tokio::test]
async fn fjord_dev_reads_its_topics_through_the_registry() {
    if skip_without_services() {
        return;
    }
    let _orders_value = ORDERS_VALUE.lock().await;
    let registry = registry();
    let port = free_port();
    let port_text = port.to_string();
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &[
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            &port_text,
            "--no-demo-producer",
            "--schema-registry",
            &registry.url,
        ],
        &[],
    );
    wait_ready(port).await;
    // Where its in-process Kafka listens, as the demo page learns it.
    let info: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/dev.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let brokers = info["kafka"].as_str().unwrap();
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/orders"), &[]).await;
    assert_eq!(client.status, 200);
    let schema = avro_order(&unique("dev"), &[]);
    produce_serialized(
        &registry,
        brokers,
        "orders",
        &serde_json::json!([
            {"format": "avro", "schema": schema, "value": avro_order_value(4), "key": "order-4"},
            {"format": "raw", "hex": hex(br#"{"plain": 1}"#)},
        ]),
    );
    let values: Vec<serde_json::Value> = next_events(&mut client, 2)
        .await
        .into_iter()
        .map(|(_, envelope)| envelope["value"].clone())
        .collect();
    assert_eq!(
        values,
        [avro_order_json(4), serde_json::json!({"plain": 1})]
    );
}

#[tokio::test]
async fn fjord_types_writes_an_endpoints_types_from_its_topics_avro_subject() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let topic = unique("sr-types");
    create_topic(&services.brokers, &topic, 1).await;
    produce_serialized(
        &registry,
        &services.brokers,
        &topic,
        &serde_json::json!([
            {"format": "avro", "schema": avro_order(&topic, &[]), "value": avro_order_value(1)},
        ]),
    );
    let mut manifest = manifest(&services, &[("orders", &topic)], &unique("group"), 0);
    manifest["schema_registry"] = serde_json::json!({"urls": [registry.url]});
    let (_dir, path) = write_manifest(&manifest);
    let output = Command::new(workspace_binary("fjord"))
        .args(["types", path.to_str().unwrap(), "orders"])
        .output()
        .unwrap();
    let types = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let order = format!(
        "{}Order",
        topic
            .split('-')
            .map(|part| part[..1].to_uppercase() + &part[1..])
            .collect::<String>()
    );
    for expected in [
        format!("export type OrdersValue = {order};"),
        format!("export interface {order} {{\n  id: string;\n  total: string;\n  day: string;"),
        "  tags: Record<string, number>;".to_owned(),
        "  note: null | string;".to_owned(),
        "export type Endpoints = {\n  \"orders\": OrdersValue;\n};".to_owned(),
    ] {
        assert!(types.contains(&expected), "{expected}\nnot in:\n{types}");
    }
}

#[tokio::test]
async fn fjord_devs_demo_producer_writes_orders_in_avro_through_the_registry() {
    if skip_without_services() {
        return;
    }
    let _orders_value = ORDERS_VALUE.lock().await;
    let registry = registry();
    // Down when `fjord dev` starts: the producer waits for it rather than giving up.
    let proxy = Proxy::start(&registry.url).await;
    let port = free_port();
    let port_text = port.to_string();
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &[
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            &port_text,
            "--schema-registry",
            &proxy.url,
        ],
        &[],
    );
    wait_ready(port).await;
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/orders"), &[]).await;
    assert_eq!(client.status, 200);
    proxy.down.store(false, Ordering::SeqCst);
    for (_, order) in next_events(&mut client, 5).await {
        assert_eq!(order["value_schema"]["subject"], "orders-value", "{order}");
        assert_eq!(order["value"]["order_id"], order["key"], "{order}");
        assert!(order["value"]["items"].is_array(), "{order}");
        assert!(order["value"]["total_cents"].is_u64(), "{order}");
    }
}

/// `tsc --noEmit` of the client's TypeScript over `dir` (its own files, `@fjord/client` from
/// client/src); the client's dev dependencies installed first when missing. Its output when
/// it fails.
fn type_check(dir: &Path) -> Result<(), String> {
    let client = repo_root().join("client");
    let tsc = client.join("node_modules/.bin/tsc");
    if !tsc.exists() {
        let status = Command::new("npm")
            .args(["ci", "--prefer-offline", "--no-audit", "--no-fund"])
            .current_dir(&client)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "npm ci in client/ failed");
    }
    let tsconfig = serde_json::json!({
        "extends": client.join("tsconfig.json"),
        "compilerOptions": {
            "noEmit": true,
            "typeRoots": [client.join("node_modules/@types")],
            "paths": {"@fjord/client": [client.join("src/index.ts")]}
        },
        "include": [dir.join("*.ts")]
    });
    std::fs::write(dir.join("tsconfig.json"), tsconfig.to_string()).unwrap();
    std::fs::write(dir.join("package.json"), r#"{"type": "module"}"#).unwrap();
    let output = Command::new(tsc)
        .arg("-p")
        .arg(dir.join("tsconfig.json"))
        .output()
        .unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

#[tokio::test]
async fn fjord_types_output_types_what_the_client_receives() {
    if skip_without_services() {
        return;
    }
    let registry = registry();
    let services = services();
    let (avro, proto, json) = (unique("ty-avro"), unique("ty-proto"), unique("ty-json"));
    let mut pipeline = named_pipeline(
        &registry.url,
        &[
            ("orders", &avro, serde_json::json!({"value_format": "avro"})),
            (
                "shipments",
                &proto,
                serde_json::json!({"value_format": "protobuf"}),
            ),
            (
                "events",
                &json,
                serde_json::json!({"value_format": "json_schema"}),
            ),
        ],
    )
    .await;
    produce_serialized(
        &registry,
        &services.brokers,
        &avro,
        &serde_json::json!([
            {"format": "avro", "schema": avro_order(&avro, &[]), "value": avro_order_value(1)},
        ]),
    );
    produce_serialized(
        &registry,
        &services.brokers,
        &proto,
        &serde_json::json!([
            {"format": "protobuf", "message": "shop.Order", "value": {
                "id": "o-1", "total": {"currency": "EUR", "units": "1250"}, "tags": ["a"],
                "status": "PAID", "lines": [{"sku": "s-1", "qty": 2}]}},
            {"format": "protobuf", "message": "shop.Shipment", "value": {"order_id": "o-1", "boxes": 3}},
        ]),
    );
    let schema = serde_json::json!({"title": json, "type": "object", "required": ["kind"],
        "properties": {"kind": {"enum": ["click", "view"]}, "at": {"type": "string"},
            "path": {"type": "array", "items": {"type": "integer"}}}});
    produce_serialized(
        &registry,
        &services.brokers,
        &json,
        &serde_json::json!([
            {"format": "json_schema", "schema": schema.to_string(),
                "value": {"kind": "click", "path": [1, 2]}},
        ]),
    );
    // What the client received, as TypeScript values of the generated types.
    let mut received = String::from(
        "import type { FjordRecord } from \"@fjord/client\";\nimport type { Endpoints } from \"./generated.js\";\n",
    );
    for (index, (endpoint, count)) in [("orders", 1), ("shipments", 2), ("events", 1)]
        .into_iter()
        .enumerate()
    {
        for (n, event) in pipeline.clients[index]
            .records(count)
            .await
            .iter()
            .enumerate()
        {
            let mut record = event.json();
            record["endpoint"] = endpoint.into();
            record["id"] = event.id.clone().unwrap().into();
            received.push_str(&format!(
                "export const {endpoint}{n}: FjordRecord<Endpoints[\"{endpoint}\"], \"{endpoint}\"> = {record};\n"
            ));
        }
    }
    let output = Command::new(workspace_binary("fjord"))
        .arg("types")
        .arg(&pipeline.manifest)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "export type OrdersValue = ",
        "export type ShipmentsValue = ShopOrder | ShopShipment;",
        "export type EventsValue = {\n  at?: string;\n  kind: \"click\" | \"view\";\n  path?: Array<number>;\n};",
    ] {
        assert!(
            generated.contains(expected),
            "{expected}\nnot in:\n{generated}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("generated.ts"), &generated).unwrap();
    std::fs::write(dir.path().join("received.ts"), &received).unwrap();
    let page = repo_root().join("client/e2e/typed/page.ts");
    std::fs::copy(&page, dir.path().join("page.ts")).unwrap();
    if let Err(errors) = type_check(dir.path()) {
        panic!("{errors}\ngenerated.ts:\n{generated}\nreceived.ts:\n{received}");
    }
    // A field the schemas do not have is a type error.
    std::fs::write(
        dir.path().join("wrong.ts"),
        "import { orders0 } from \"./received.js\";\nexport const wrong: string = orders0.value.no_such_field;\n",
    )
    .unwrap();
    let errors = type_check(dir.path()).expect_err("a wrong field type-checks");
    assert!(
        errors.contains("wrong.ts") && errors.contains("no_such_field"),
        "{errors}"
    );
    drop(pipeline.consumer);
}
