//! The demo producer of `fjord dev`: a small SuperEats simulation. Orders are placed,
//! prepared, picked up and delivered; drivers drive across Oslo to fetch and bring them.
//! With a Schema Registry, orders are written in Avro in the Confluent wire format, with a
//! schema of the same shape registered as `orders-value`, so the page shows them decoded.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use super::DevError;
use fjord_bus::backoff::Backoff;
use fjord_config::Manifest;
use fjord_consumer::client_config;

const RESTAURANTS: [&str; 6] = [
    "Nonna's Pizza",
    "Pho Grünerløkka",
    "Burger Bryggen",
    "Sushi Aker",
    "Curry House",
    "Taco Torget",
];
const DISHES: [&str; 8] = [
    "Margherita",
    "Pho bo",
    "Cheeseburger",
    "Salmon nigiri",
    "Butter chicken",
    "Al pastor",
    "Fries",
    "Cola",
];
const CUSTOMERS: [&str; 8] = [
    "Ada L.",
    "Alan K.",
    "Grace H.",
    "Edsger D.",
    "Barbara L.",
    "Ken T.",
    "Margaret H.",
    "Linus T.",
];
const DRIVERS: [&str; 8] = [
    "Sam", "Nora", "Emil", "Sofie", "Jonas", "Ingrid", "Ola", "Kari",
];
const STATUSES: [&str; 4] = ["placed", "preparing", "picked_up", "delivered"];
/// Oslo, roughly.
const LAT: (f64, f64) = (59.90, 59.94);
const LON: (f64, f64) = (10.70, 10.80);

/// The Avro schema of the demo's orders: the JSON orders' shape.
const ORDER_SCHEMA: &str = r#"{"type": "record", "name": "Order", "namespace": "supereats", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "restaurant", "type": "string"},
    {"name": "customer", "type": "string"},
    {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item",
        "fields": [{"name": "name", "type": "string"}, {"name": "qty", "type": "int"}]}}},
    {"name": "total_cents", "type": "long"},
    {"name": "status", "type": "string"},
    {"name": "driver_id", "type": ["null", "string"]}
]}"#;

/// Orders in the Confluent wire format: the id the registry gave their schema, and it.
struct AvroOrders {
    id: u32,
    schema: apache_avro::Schema,
}

impl AvroOrders {
    /// Registers the orders' schema as `orders-value` at the registry's base `url`.
    async fn register(url: &str) -> Result<Self, DevError> {
        let failed =
            |error: String| DevError::Registry(format!("registering orders-value: {error}"));
        let schema =
            apache_avro::Schema::parse_str(ORDER_SCHEMA).map_err(|e| failed(e.to_string()))?;
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!(
                "{}/subjects/orders-value/versions",
                url.trim_end_matches('/')
            ))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({"schema": ORDER_SCHEMA}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| failed(e.without_url().to_string()))?
            .json()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let id = answer["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| failed(format!("no schema id in {answer}")))?;
        Ok(Self { id, schema })
    }

    /// Registers the schema, again and again while the registry refuses or does not answer
    /// (it may still be starting, or busy with another writer of the same subject), until
    /// it takes it or `stop` resolves (then `None`).
    async fn register_until(
        url: &str,
        stop: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Self> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match Self::register(url).await {
                Ok(orders) => return Some(orders),
                Err(error) => {
                    tracing::warn!(%error, "the demo's orders wait for the schema registry");
                }
            }
            tokio::select! {
                () = stop.as_mut() => return None,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// An order as the wire format: a zero byte, the id, the Avro datum.
    fn encode(&self, order: &serde_json::Value) -> Result<Vec<u8>, apache_avro::Error> {
        let value = apache_avro::types::Value::from(order.clone()).resolve(&self.schema)?;
        let mut bytes = vec![0];
        bytes.extend(self.id.to_be_bytes());
        bytes.extend(apache_avro::to_avro_datum(&self.schema, value)?);
        Ok(bytes)
    }
}

/// Creates the demo topics on a real Kafka if they are missing; true when it created them
/// all, so that they hold only what this run produces.
pub(super) async fn ensure_topics(manifest: &Manifest, partitions: i32) -> Result<bool, DevError> {
    let admin: AdminClient<DefaultClientContext> = client_config(&manifest.kafka)?
        .create()
        .map_err(DevError::CreateTopics)?;
    let topics: Vec<NewTopic<'_>> = super::DEMO_TOPICS
        .iter()
        .map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(1)))
        .collect();
    let mut created_all = true;
    let created = admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .map_err(DevError::CreateTopics)?;
    for result in created {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => created_all = false,
            Err((topic, code)) => return Err(DevError::CreateTopic { topic, code }),
        }
    }
    Ok(created_all)
}

struct Driver {
    name: &'static str,
    lat: f64,
    lon: f64,
    target: Option<(f64, f64)>,
    order: Option<usize>,
}

struct Order {
    id: u64,
    restaurant: &'static str,
    customer: &'static str,
    items: serde_json::Value,
    total_cents: u64,
    stage: usize,
    driver: Option<usize>,
}

fn between((low, high): (f64, f64)) -> f64 {
    low + fastrand::f64() * (high - low)
}

fn now_ms() -> i64 {
    i64::try_from(fjord_bus::clock::now_ms()).unwrap_or(i64::MAX)
}

struct Simulation {
    drivers: Vec<Driver>,
    orders: Vec<Order>,
    next_order: u64,
}

impl Simulation {
    fn new() -> Self {
        let drivers = DRIVERS
            .iter()
            .map(|name| Driver {
                name,
                lat: between(LAT),
                lon: between(LON),
                target: None,
                order: None,
            })
            .collect();
        Self {
            drivers,
            orders: Vec::new(),
            next_order: 1,
        }
    }

    fn place_order(&mut self) -> (String, serde_json::Value) {
        let items: Vec<_> = (0..fastrand::usize(1..4))
            .map(|_| json!({"name": DISHES[fastrand::usize(..DISHES.len())], "qty": fastrand::u8(1..4)}))
            .collect();
        let order = Order {
            id: self.next_order,
            restaurant: RESTAURANTS[fastrand::usize(..RESTAURANTS.len())],
            customer: CUSTOMERS[fastrand::usize(..CUSTOMERS.len())],
            items: serde_json::Value::Array(items),
            total_cents: fastrand::u64(900..6000),
            stage: 0,
            driver: None,
        };
        self.next_order += 1;
        self.orders.push(order);
        self.order_record(self.orders.len() - 1)
    }

    fn order_record(&self, index: usize) -> (String, serde_json::Value) {
        let order = &self.orders[index];
        let key = format!("order-{}", order.id);
        let value = json!({
            "order_id": key,
            "restaurant": order.restaurant,
            "customer": order.customer,
            "items": order.items,
            "total_cents": order.total_cents,
            "status": STATUSES[order.stage],
            "driver_id": order.driver.map(|d| format!("driver-{}", d + 1)),
        });
        (key, value)
    }

    /// Moves one order a step on; returns its new record.
    fn advance_order(&mut self) -> Option<(String, serde_json::Value)> {
        let index = fastrand::usize(..self.orders.len().max(1));
        let order = self.orders.get_mut(index)?;
        if order.stage == 0 {
            let free = self
                .drivers
                .iter()
                .position(|driver| driver.order.is_none())?;
            order.driver = Some(free);
            self.drivers[free].order = Some(index);
            self.drivers[free].target = Some((between(LAT), between(LON)));
        }
        let order = self.orders.get_mut(index)?;
        order.stage += 1;
        let record = self.order_record(index);
        if self.orders[index].stage == STATUSES.len() - 1 {
            if let Some(driver) = self.orders[index].driver {
                self.drivers[driver].order = None;
                self.drivers[driver].target = None;
            }
            self.orders.remove(index);
            // Indexes after the removed order moved down by one.
            for driver in &mut self.drivers {
                driver.order = driver.order.map(|o| if o > index { o - 1 } else { o });
            }
        }
        Some(record)
    }

    fn move_driver(&mut self, index: usize) -> (String, serde_json::Value) {
        let driver = &mut self.drivers[index];
        let (target_lat, target_lon) = driver.target.unwrap_or((
            driver.lat + (fastrand::f64() - 0.5) * 0.004,
            driver.lon + (fastrand::f64() - 0.5) * 0.008,
        ));
        let step = 0.15;
        let (d_lat, d_lon) = (
            (target_lat - driver.lat) * step,
            (target_lon - driver.lon) * step,
        );
        driver.lat = (driver.lat + d_lat).clamp(LAT.0, LAT.1);
        driver.lon = (driver.lon + d_lon).clamp(LON.0, LON.1);
        let heading = d_lon.atan2(d_lat).to_degrees().rem_euclid(360.0).round();
        let order_id = driver
            .order
            .and_then(|o| self.orders.get(o))
            .map(|o| format!("order-{}", o.id));
        let key = format!("driver-{}", index + 1);
        let value = json!({
            "driver_id": key,
            "name": driver.name,
            "lat": (driver.lat * 1e5).round() / 1e5,
            "lon": (driver.lon * 1e5).round() / 1e5,
            "heading": heading,
            "status": if order_id.is_some() { "en_route" } else { "idle" },
            "order_id": order_id,
        });
        (key, value)
    }
}

/// How often the simulation moves on.
const TICK: Duration = Duration::from_millis(250);
/// Rounds of history simulated at start (40 s), so that a page opened at once is full.
const HISTORY_ROUNDS: u32 = 160;

impl Simulation {
    /// The records of one round: a new order every fourth, an order moved on every second,
    /// and one driver moved every round.
    fn round(&mut self, round: u64) -> Vec<(&'static str, (String, serde_json::Value))> {
        let mut records = Vec::new();
        if round.is_multiple_of(4) && self.orders.len() < 40 {
            records.push(("orders", self.place_order()));
        }
        if round % 2 == 1
            && let Some(record) = self.advance_order()
        {
            records.push(("orders", record));
        }
        let driver = usize::try_from(round).unwrap_or(0) % DRIVERS.len();
        records.push(("drivers", self.move_driver(driver)));
        records
    }
}

/// Produces one demo record, an order in Avro when there is `avro`; a failure is logged,
/// as the next round makes up for it.
async fn produce(
    producer: &FutureProducer,
    avro: Option<&AvroOrders>,
    topic: &str,
    (key, value): &(String, serde_json::Value),
    timestamp: i64,
) {
    let payload = match avro.filter(|_| topic == "orders") {
        Some(avro) => match avro.encode(value) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(topic, %error, "demo order not encoded");
                return;
            }
        },
        None => value.to_string().into_bytes(),
    };
    let headers = OwnedHeaders::new().insert(Header {
        key: "source",
        value: Some("fjord-dev"),
    });
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(&payload)
        .timestamp(timestamp)
        .headers(headers);
    if let Err((error, _)) = producer.send(record, Duration::from_secs(5)).await {
        tracing::warn!(topic, %error, "demo record not produced");
    }
}

/// Produces demo records until `stop` resolves: first the last 40 s of the simulation at
/// once, with the timestamps they would have had, then a round every 250 ms.
pub(super) async fn run(
    manifest: &Manifest,
    stop: impl Future<Output = ()>,
) -> Result<(), DevError> {
    let producer: FutureProducer = client_config(&manifest.kafka)?
        .set("linger.ms", "5")
        .set("message.timeout.ms", "10000")
        .create()?;
    let registry = manifest
        .schema_registry
        .as_ref()
        .and_then(|registry| registry.urls.first());
    tokio::pin!(stop);
    let avro = match registry {
        Some(url) => match AvroOrders::register_until(url, &mut stop).await {
            Some(orders) => Some(orders),
            None => return Ok(()),
        },
        None => None,
    };
    let mut simulation = Simulation::new();
    let tick_ms = i64::try_from(TICK.as_millis()).unwrap_or(250);
    let started = now_ms() - i64::from(HISTORY_ROUNDS) * tick_ms;
    let history: Vec<_> = (0..u64::from(HISTORY_ROUNDS))
        .flat_map(|round| {
            let at = started + i64::try_from(round).unwrap_or(0) * tick_ms;
            simulation
                .round(round)
                .into_iter()
                .map(move |(topic, record)| (topic, record, at))
        })
        .collect();
    // Sent together, so librdkafka batches them; each is queued when first polled, in order.
    futures_util::future::join_all(
        history
            .iter()
            .map(|(topic, record, at)| produce(&producer, avro.as_ref(), topic, record, *at)),
    )
    .await;
    let mut tick = tokio::time::interval(TICK);
    for round in u64::from(HISTORY_ROUNDS).. {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {}
        }
        for (topic, record) in simulation.round(round) {
            produce(&producer, avro.as_ref(), topic, &record, now_ms()).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_of_the_simulation_is_avro_of_the_orders_schema() {
        let avro = AvroOrders {
            id: 7,
            schema: apache_avro::Schema::parse_str(ORDER_SCHEMA).expect("schema"),
        };
        let mut simulation = Simulation::new();
        let orders: Vec<_> = (0..200)
            .flat_map(|round| simulation.round(round))
            .filter(|(topic, _)| *topic == "orders")
            .collect();
        assert!(
            orders
                .iter()
                .any(|(_, (_, order))| order["driver_id"].is_null())
        );
        assert!(
            orders
                .iter()
                .any(|(_, (_, order))| order["driver_id"].is_string())
        );
        for (_, (_, order)) in orders {
            let bytes = avro.encode(&order).expect("encodes");
            assert_eq!(bytes[..5], [0, 0, 0, 0, 7]);
            // Decoding sets apache-avro's process-wide bound, which the consumer relies on.
            assert!(fjord_consumer::decode::avro_limit_in_force());
            let decoded = apache_avro::from_avro_datum(&avro.schema, &mut &bytes[5..], None)
                .expect("decodes");
            let apache_avro::types::Value::Record(fields) = decoded else {
                panic!("not a record: {decoded:?}");
            };
            assert_eq!(
                fields[0].1,
                apache_avro::types::Value::String(
                    order["order_id"].as_str().expect("id").to_owned()
                )
            );
        }
    }
}
