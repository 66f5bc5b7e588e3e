"""One request through the fleet: choose a box, send the job, retry elsewhere, relay the answer.

``Gateway.start(call)`` tries boxes in ``routing.choose``'s order until one starts answering:
a refusal (``busy``, ``overloaded``) or a box going offline before its first reply moves the
request to the next box (at most ``max_attempts``); any other outcome is the answer.  Once
the first reply is in, ``Answer`` carries it and the rest streams from the same box: a box
that goes offline then ends the stream with an error event (nothing retried: the client has
text already).  A client that goes away cancels the job on its box.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError, Call
from edge_contract.protocol import Chunk, JobRequest, Result

from ..broker_link import BrokerLink
from .dispatch import Dispatcher, Item, LinkDown, Offline
from .routing import Candidate, choose, matches, parse_target, why_none

log = logging.getLogger(__name__)

#: Job errors after which the request goes to another box (the box refused it, or lost it unstarted).
RETRY_CODES = frozenset({"busy", "overloaded"})
#: Seconds a box that refused counts as busy (when the refusal names no Retry-After).
REFUSED_S = 2.0


@dataclass
class _Box:
    in_flight: int = 0
    refused_until: float = 0.0
    last_assigned: float = 0.0


@dataclass
class Answer:
    """A request under way on one box: its first reply is in."""

    call: Call
    job_id: str
    device_id: str
    first: Chunk | Result
    queue: asyncio.Queue[Item]
    gateway: Gateway
    ticket: bytes
    created: int = field(default_factory=api.created_at)
    _done: bool = False
    _ended: bool = False  # the result arrived: nothing to cancel

    async def result(self) -> Result:
        """The whole answer of a non-streamed request (chunks, if any, are skipped)."""
        try:
            item: Item = self.first
            while isinstance(item, Chunk):
                item = await self._next()
            if not isinstance(item, Result):
                raise self.gateway.lost(self.device_id, item, started=False)
            self._ended = True
            if item.status != "succeeded":
                raise self.gateway.error_of(self.call, item)
            return item
        finally:
            await self.close()

    async def stream(self) -> AsyncIterator[bytes]:
        """The dialect's events; an error event (not a hang) when the box goes away mid-answer."""
        first, seen, streamed = True, set[int](), False
        writer = api.StreamWriter(self.call, self.job_id, self.created)
        try:
            item: Item = self.first
            while True:
                # What came meanwhile goes out in one write: a busy server makes fewer sends, never more.
                out: list[bytes] = []
                while isinstance(item, Chunk):
                    if item.seq not in seen:  # QoS 1 may deliver a chunk twice
                        seen.add(item.seq)
                        streamed = True
                        out.append(writer.piece(item.text, first=first))
                        first = False
                    if self.queue.empty():
                        break
                    item = self.queue.get_nowait()
                if isinstance(item, Chunk):
                    if out:
                        yield b"".join(out)
                    item = await self._next()
                    continue
                self._ended = isinstance(item, Result)
                if isinstance(item, Result) and item.status == "succeeded":
                    if item.text and not streamed:  # a box that streams nothing (an older agent)
                        out.append(writer.piece(item.text, first=first))
                        first = False
                    outcome: Result | ApiError = item
                elif isinstance(item, Result):
                    outcome = self.gateway.error_of(self.call, item)
                else:
                    outcome = self.gateway.lost(self.device_id, item, started=True)
                out += api.stream_end(self.call, self.job_id, self.created, outcome, first=first)
                yield b"".join(out)
                return
        except Exception:  # a bug: logged, and the stream still ends with a word
            log.exception("gateway: relaying %s from %s failed", self.job_id, self.device_id)
            failed = ApiError(500, "internal error (logged by the fleet server)", type="server_error")
            for event in api.stream_end(self.call, self.job_id, self.created, failed, first=first):
                yield event
        finally:
            await self.close()

    async def _next(self) -> Item:
        try:
            async with asyncio.timeout(self.gateway.timeout_s):
                return await self.queue.get()
        except TimeoutError:
            return LinkDown(f"no reply from {self.device_id} within {self.gateway.timeout_s:.0f} s")

    async def close(self) -> None:
        """Done with the job: forget it (and cancel it on the box if it had not ended)."""
        if self._done:
            return
        self._done = True
        self.gateway.finish(self)


class Gateway:
    """The routing state (jobs in flight, refusals) and the request loop over a ``Dispatcher``."""

    def __init__(
        self, link: BrokerLink, dispatcher: Dispatcher, *, timeout_s: float = 900.0, max_attempts: int = 3
    ) -> None:
        self.link = link
        self.dispatcher = dispatcher
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._boxes: dict[str, _Box] = {}

    # -- the fleet's state ---------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Every box the broker link knows, with the gateway's own counts."""
        now = time.time()
        found = []
        with self.link.lock:
            for device in list(self.link.view.devices.values()):
                if device.status is None:
                    continue
                row = self.link.view.row(device)
                tele = device.telemetry
                health = (tele.health if tele and tele.health else None) or device.status.health
                found.append((device.device_id, row, tele, health))
        with self._lock:
            boxes = {
                name: (box.in_flight, box.refused_until, box.last_assigned)
                for name, box in self._boxes.items()
            }
        out = []
        for device_id, row, tele, health in found:
            in_flight, refused_until, last_assigned = boxes.get(device_id, (0, 0.0, 0.0))
            out.append(
                Candidate(
                    device_id=device_id,
                    online=bool(row.online) and not self.dispatcher.offline(device_id),
                    group=row.group,
                    model=row.model,
                    healthy=row.health != "degraded",
                    shedding=bool(health and health.overloaded),
                    queue_depth=row.queue,
                    telemetry_age_s=now - tele.ts if tele else None,
                    telemetry_interval_s=tele.interval_s if tele else None,
                    in_flight=in_flight,
                    refused_until=refused_until,
                    last_assigned=last_assigned,
                )
            )
        return out

    # -- one request ---------------------------------------------------------------------------------

    def job_of(self, call: Call) -> JobRequest:
        """The job for ``call`` (a 400 naming the field, in the dialect's words, when the contract refuses it)."""
        try:
            return JobRequest.model_validate({**call.job, "id": "gw-" + uuid.uuid4().hex})
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            message = f"{where}: {problem['msg']}" if where else str(problem["msg"])
            raise api.error_for(call, "invalid_request", message, overloaded_retry_s=REFUSED_S_INT) from None

    async def start(self, call: Call) -> Answer:
        """Send ``call`` to the best box that takes it; returns once its first reply is in."""
        job = self.job_of(call)
        target = parse_target(call.model)
        tried: set[str] = set()
        last: ApiError | None = None
        loop = asyncio.get_running_loop()
        for _attempt in range(self.max_attempts):
            boxes = self.candidates()
            order = choose(target, boxes, now=time.monotonic(), exclude=frozenset(tried))
            if not order:
                if last is not None:
                    raise last
                known = any(matches(target, c) for c in boxes)
                raise ApiError(
                    503 if known else 404, why_none(target, boxes, frozenset(tried)),
                    type="server_error" if known else "invalid_request_error",
                    code="no_box" if known else "model_not_found", param=None if known else "model",
                    retry_after=REFUSED_S_INT if known else None,
                )  # fmt: skip
            device = order[0]
            tried.add(device)
            queue: asyncio.Queue[Item] = asyncio.Queue()
            ticket = self._send(device, job, queue, loop)
            try:
                async with asyncio.timeout(self.timeout_s):
                    first = await queue.get()
            except TimeoutError:
                first = LinkDown(f"no reply from {device} within {self.timeout_s:.0f} s")
            except BaseException:  # the client left while waiting
                self._end(device, job.id, ticket, cancel=True)
                raise
            if isinstance(first, Chunk) or (isinstance(first, Result) and first.status == "succeeded"):
                return Answer(call, job.id, device, first, queue, self, ticket)
            retry = isinstance(first, Offline) or _refused(first)
            self._end(device, job.id, ticket, cancel=not isinstance(first, Result))
            if isinstance(first, Result):
                last = self.error_of(call, first)
                if retry:
                    self._refused(device, last.retry_after)
            else:
                last = self.lost(device, first, started=False)
            log.info(
                "gateway: %s on %s: %s%s", job.id, device, last.message, "; trying another" if retry else ""
            )
            if not retry:
                raise last
            job = job.model_copy(update={"id": "gw-" + uuid.uuid4().hex})  # a new id on the next box
        assert last is not None
        raise last

    def _send(
        self, device: str, job: JobRequest, queue: asyncio.Queue[Item], loop: asyncio.AbstractEventLoop
    ) -> bytes:
        with self._lock:
            box = self._boxes.setdefault(device, _Box())
            box.in_flight += 1
            box.last_assigned = time.monotonic()

        def sink(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stops
                loop.call_soon_threadsafe(queue.put_nowait, item)

        return self.dispatcher.send(device, job, sink)

    def _end(self, device: str, job_id: str, ticket: bytes, *, cancel: bool) -> None:
        self.dispatcher.forget(ticket)
        with self._lock:
            box = self._boxes.setdefault(device, _Box())
            box.in_flight = max(0, box.in_flight - 1)
        if cancel:
            try:
                self.dispatcher.cancel(device, job_id)
            except Exception:
                log.exception("gateway: cannot cancel %s on %s", job_id, device)

    def _refused(self, device: str, retry_after: int | None) -> None:
        with self._lock:
            box = self._boxes.setdefault(device, _Box())
            box.refused_until = time.monotonic() + (retry_after or REFUSED_S)

    def finish(self, answer: Answer) -> None:
        """An answer ends (its result relayed, or its client gone: then the box is told to cancel)."""
        self._end(answer.device_id, answer.job_id, answer.ticket, cancel=not answer._ended)

    def error_of(self, call: Call, result: Result) -> ApiError:
        """The HTTP error of a result that did not succeed."""
        return api.result_error(call, result, overloaded_retry_s=REFUSED_S_INT)

    def lost(self, device: str, item: Item, *, started: bool) -> ApiError:
        """The error for a box gone (offline, or the broker link down)."""
        if isinstance(item, Offline):
            when = "mid-answer" if started else "before answering"
            message = f"box {device} went offline {when}; retry: the next request goes to another box"
        else:
            message = f"{item.reason if isinstance(item, LinkDown) else item}; retry"
        return ApiError(503, message, type="server_error", code="box_lost", retry_after=1)


REFUSED_S_INT = int(REFUSED_S)


def _refused(item: Item) -> bool:
    return isinstance(item, Result) and item.error is not None and item.error.code in RETRY_CODES
