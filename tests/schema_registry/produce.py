"""Produces records for tests/schema_registry.rs with confluent-kafka's real serializers.

Reads one JSON object on stdin: {"brokers", "registry", "topic", "records": [...]}, produces
the records in order to partition 0 and prints their offsets as a JSON array. A record is
{"format": F, "value": V, "key": optional text, ...}:

  avro          "schema": Avro schema (JSON text), "subject" (optional): AvroSerializer;
                in V, {"$decimal": "1.50"} is a decimal.Decimal and {"$hex": "ff00"} bytes; "corrupt": true keeps
                only the wire format's header and writes bytes no Avro decoder accepts
  protobuf      "message": shop.Order | shop.Shipment | shop.Order.Line: ProtobufSerializer
                (the schema, shop/order.proto importing shop/money.proto, registered with
                its reference)
  proto_text    "message": Ping, V for txt.Ping: the schema registered as .proto text by
                REST, the wire format written here (the serializer registers descriptors only)
  json_schema   "schema": JSON Schema text, "subject" (optional): JSONSerializer
  raw           "hex": the value's bytes, as they are

A record's key is "key" (text), or "key_avro": {"schema", "value"}, written by AvroSerializer
under the topic's key subject.
"""
import decimal
import json
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

F = descriptor_pb2.FieldDescriptorProto


def field(message, name, number, kind, type_name=None, repeated=False):
    f = message.field.add(name=name, number=number, type=kind,
                          label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
    if type_name:
        f.type_name = type_name


def protobuf_pool():
    money = descriptor_pb2.FileDescriptorProto(name="shop/money.proto", package="shop", syntax="proto3")
    m = money.message_type.add(name="Money")
    field(m, "currency", 1, F.TYPE_STRING)
    field(m, "units", 2, F.TYPE_INT64)

    order = descriptor_pb2.FileDescriptorProto(name="shop/order.proto", package="shop", syntax="proto3",
                                               dependency=["shop/money.proto"])
    status = order.enum_type.add(name="Status")
    status.value.add(name="NEW", number=0)
    status.value.add(name="PAID", number=1)
    o = order.message_type.add(name="Order")
    field(o, "id", 1, F.TYPE_STRING)
    field(o, "total", 2, F.TYPE_MESSAGE, ".shop.Money")
    field(o, "tags", 3, F.TYPE_STRING, repeated=True)
    field(o, "status", 4, F.TYPE_ENUM, ".shop.Status")
    field(o, "lines", 5, F.TYPE_MESSAGE, ".shop.Order.Line", repeated=True)
    line = o.nested_type.add(name="Line")
    field(line, "sku", 1, F.TYPE_STRING)
    field(line, "qty", 2, F.TYPE_INT32)
    s = order.message_type.add(name="Shipment")
    field(s, "order_id", 1, F.TYPE_STRING)
    field(s, "boxes", 2, F.TYPE_INT32)

    ping = descriptor_pb2.FileDescriptorProto(name="txt/ping.proto", package="txt", syntax="proto3")
    p = ping.message_type.add(name="Ping")
    field(p, "note", 1, F.TYPE_STRING)
    field(p, "n", 2, F.TYPE_INT64)

    pool = descriptor_pool.DescriptorPool()
    for fdp in (money, order, ping):
        pool.Add(fdp)
    return pool


PING_PROTO = 'syntax = "proto3";\npackage txt;\n\nmessage Ping {\n  string note = 1;\n  int64 n = 2;\n}\n'


def avro_value(value):
    if isinstance(value, dict):
        if set(value) == {"$decimal"}:
            return decimal.Decimal(value["$decimal"])
        if set(value) == {"$hex"}:
            return bytes.fromhex(value["$hex"])
        return {k: avro_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [avro_value(v) for v in value]
    return value


def subject(record):
    """The serializer's settings for the record's "subject", when it names one."""
    if "subject" not in record:
        return {}
    return {"subject.name.strategy": lambda _ctx, _name, s=record["subject"]: s}


def registered(encode, attempts=5):
    """Runs `encode`, again when the registry answers 5xx: Apicurio's in-memory (H2) storage
    sometimes refuses a schema registered at the same moment by another test with a unique
    key violation, and takes it on the next try."""
    for attempt in range(attempts):
        try:
            return encode()
        except SchemaRegistryError as error:
            if error.http_status_code < 500 or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def main():
    job = json.load(sys.stdin)
    registry = SchemaRegistryClient({"url": job["registry"]})
    topic = job["topic"]
    ctx = SerializationContext(topic, MessageField.VALUE)
    pool = protobuf_pool()
    producer = Producer({"bootstrap.servers": job["brokers"], "acks": "all", "enable.idempotence": True})
    offsets = [None] * len(job["records"])

    def delivered(index):
        def report(error, message):
            if error is not None:
                raise SystemExit(f"produce to {topic}: {error}")
            offsets[index] = message.offset()
        return report

    def encode(record):
        kind = record["format"]
        if kind == "avro":
            value = AvroSerializer(registry, record["schema"], conf=subject(record))(avro_value(record["value"]), ctx)
            if record.get("corrupt"):
                # The header of a real schema, then a string length of -1.
                value = value[:5] + b"\x01"
        elif kind == "protobuf":
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(record["message"]))
            serializer = ProtobufSerializer(cls, registry, {"use.deprecated.format": False})
            value = serializer(json_format.ParseDict(record["value"], cls()), ctx)
        elif kind == "proto_text":
            schema_id = registry.register_schema(record["subject"], Schema(PING_PROTO, "PROTOBUF"))
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("txt.Ping"))
            body = json_format.ParseDict(record["value"], cls()).SerializeToString()
            value = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00" + body
        elif kind == "json_schema":
            value = JSONSerializer(record["schema"], registry, conf=subject(record))(record["value"], ctx)
        elif kind == "raw":
            value = bytes.fromhex(record["hex"])
        else:
            raise SystemExit(f"unknown format {kind}")
        key = record.get("key")
        if key is not None:
            key = key.encode()
        elif "key_avro" in record:
            key_ctx = SerializationContext(topic, MessageField.KEY)
            key = AvroSerializer(registry, record["key_avro"]["schema"])(
                avro_value(record["key_avro"]["value"]), key_ctx)
        return value, key

    for index, record in enumerate(job["records"]):
        value, key = registered(lambda: encode(record))
        producer.produce(topic, value=value, key=key,
                         partition=0, on_delivery=delivered(index))
        producer.poll(0)
    if producer.flush(60) != 0:
        raise SystemExit("records still in flight after 60 s")
    json.dump(offsets, sys.stdout)


main()
