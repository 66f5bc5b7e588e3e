"""The agent daemon: jobs in over MQTT (and HTTP), stored durably, answered by one worker.

The pieces, each in its own module, and the thread that owns each:

================  =====================  ==================================================
module            owning thread          what it holds
================  =====================  ==================================================
``intake``        none (pure)            the admission ladder: message + view -> decision
``inbox``         intake (main thread)   drains the link's events, carries decisions out,
                                         acknowledges messages, retries after storage errors
``outbox``        none (a lock)          pending results by message id, their ack futures,
                                         re-publication after reconnects
``worker``        ``edge-agent-worker``  claim, run, finish, requeue; model swaps between jobs
``outcome``       none (pure)            a run's result, and whether a failure is the model's
``supervisor``    intake (main thread)   health, telemetry, systemd watchdog and status line,
                                         the retained status
``faults``        none (a lock)          storage errors: counted, logged sparingly, backoff
``results``       none (pure)            error results and the one log line per job
``replies``       none (thread-safe)     the reply sink seam: each reply routed by its job's
                                         address, MQTT topics to the outbox, ``http:<id>`` to
                                         the HTTP server; HTTP jobs canceled at start
``agent``         main thread            ``Agent``: builds and wires them, runs the loop
================  =====================  ==================================================

The HTTP API (``agent.daemon.http``, when ``[http] listen`` is set) is the second job
source: its request threads (``edge-agent-http`` and one per connection)
submit jobs through ``Inbox.submit``, the same admission as MQTT jobs, and
receive their chunks and result through ``replies``.

Other threads: the link's network thread (inside ``MQTTLink``) only queues events
(and publishes the status and model state on connect); the updater's thread
(``agent.updates.updater``) downloads and tests releases and hands the switch
to the worker.

A job is acknowledged to the broker only after it is committed to the
``JobStore``; its result stays stored until the broker acknowledges it.  So a
``kill -9`` at any moment loses nothing: an unacknowledged job is redelivered,
a stored one is resumed, an unacknowledged result is published again.  No
exception from storage, the network or a request ends a thread: storage errors
are retried with backoff (see ``faults``), and a job whose result could not be
stored is finished when the disk takes writes again.
"""

from __future__ import annotations

from agent.daemon.agent import Agent

__all__ = ["Agent"]
