"""Produce loom payloads to Kafka in loom's wire format (msgpack envelopes), for tests, benches and
the example. ``python -m loom_dagster.dev.produce orders 1000`` sends sample orders to the example."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import Producer


def encode(payload: Any, version: int = 1) -> bytes:
    """One payload as a loom msgpack envelope (what ``FromTopic`` decodes)."""
    from loom.streaming.kafka import MessageDescriptor, MsgspecCodec, build_message

    descriptor = MessageDescriptor(message_type=type(payload).loom_message_type(), message_version=version)
    return MsgspecCodec[Any]().encode(build_message(payload, descriptor))


def produce(
    bootstrap: str,
    topic: str,
    payloads: Iterable[Any],
    key: Callable[[Any], str] | None = None,
    *,
    raw: bool = False,
) -> int:
    """Send *payloads* (loom structs, or bytes with ``raw=True``) and flush; return how many were sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    count = 0
    for payload in payloads:
        value = payload if raw else encode(payload)
        producer.produce(topic, value=value, key=key(payload).encode() if key else None)
        count += 1
        if count % 10_000 == 0:
            producer.flush()
    remaining = producer.flush(30)
    if remaining:
        raise RuntimeError(f"{remaining} message(s) to {topic!r} were not delivered within 30 s")
    return count


def sample_orders(count: int, start: int = 0, seed: int = 7) -> Sequence[Any]:
    """Sample orders for the example flow; every 50th has a negative amount (goes to the DLQ)."""
    from definitions.flows.orders import Order

    rng = random.Random(seed + start)
    return [
        Order(
            order_id=f"o-{i}",
            customer_id=f"c-{rng.randint(1, 20)}",
            amount=(-1.0 if i % 50 == 49 else round(rng.uniform(1, 250), 2)),
        )
        for i in range(start, start + count)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: produce sample orders to the example's ``orders`` topic."""
    parser = argparse.ArgumentParser(prog="loom_dagster.dev.produce")
    parser.add_argument("what", choices=["orders"])
    parser.add_argument("count", type=int)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--bootstrap", default=os.environ.get("LOOM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    args = parser.parse_args(argv)
    sent = produce(
        args.bootstrap, "orders", sample_orders(args.count, args.start), key=lambda o: o.customer_id
    )
    print(f"sent {sent} orders to {args.bootstrap}")


if __name__ == "__main__":
    main()
