"""What the link's typed ``Client`` costs over raw paho: a burst of QoS 1 publications.

Run as ``python bench/mqtt_client_bench.py [--messages 5000] [--rounds 5]``.

Both sides publish ``--messages`` 200-byte messages at QoS 1 to a real mosquitto on
loopback, then wait for every PUBACK: raw paho (``MQTTMessageInfo.wait_for_publish``,
TCP_NODELAY as the wrapper sets it) against ``Client.publish_all`` (an ``Ack`` future per
packet id).  Rounds alternate, so a busy machine slows both alike; the medians and
their ratio are printed with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.link.mqtt import Client, no_delay  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the mosquitto the tests use)


def raw(port: int, messages: list[tuple[str, bytes]]) -> float:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw", protocol=MQTTProtocolVersion.MQTTv5)
    client.max_queued_messages_set(0)
    client.on_socket_open = no_delay
    client.connect("127.0.0.1", port)
    client.loop_start()
    while not client.is_connected():
        time.sleep(0.01)
    start = time.perf_counter()
    sent = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in sent:
        info.wait_for_publish(60)
    took = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return took


def wrapped(port: int, messages: list[tuple[str, bytes]]) -> float:
    client = Client(name="bench")
    client.connect("127.0.0.1", port)
    start = time.perf_counter()
    client.publish_all(messages, retain=False, timeout=60)
    took = time.perf_counter() - start
    client.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    messages = [(f"bench/{i}", b"x" * 200) for i in range(args.messages)]
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            times: dict[str, list[float]] = {"raw paho": [], "Client": []}
            for _ in range(args.rounds):
                times["raw paho"].append(raw(broker.port, messages))
                times["Client"].append(wrapped(broker.port, messages))
        finally:
            broker.stop()
    base = statistics.median(times["raw paho"])
    print(f"| {args.messages} QoS 1 publications | median ms | per message µs | vs raw paho |")
    print("|---|---|---|---|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {median * 1000:.0f} | {median / args.messages * 1e6:.0f} | {median / base:.2f}x |")
    load = os.getloadavg()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    print(
        f"\nMachine: {cpu}, {os.cpu_count()} cores; "
        f"load average {load[0]:.1f} (other work shares it); mosquitto on loopback."
    )


if __name__ == "__main__":
    main()
