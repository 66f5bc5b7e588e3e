"""``Ack``: the broker's answer to one packet, a future per packet id."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from agent.link.mqtt.errors import NoAnswer, PublishRefused
from edge_contract.errors import LinkError

#: A CONNACK, SUBACK or PUBACK takes milliseconds; 10 s covers a busy broker and a slow link.
ANSWER_TIMEOUT_S = 10.0


class Ack:
    """The broker's answer to one packet: a PUBACK (``[None]``, or raises ``PublishRefused``) or a
    SUBACK/UNSUBACK (one entry per filter: None granted, else the refusal in words)."""

    def __init__(self, where: str, what: str) -> None:
        self._future: Future[list[str | None]] = Future()
        self._where, self.what = where, what

    def wait(self, timeout: float = ANSWER_TIMEOUT_S) -> list[str | None]:
        """The answer; ``NoAnswer`` after ``timeout`` s, ``ConnectionLost`` when the connection dropped."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise NoAnswer(self._where, self.what, timeout) from None

    def done(self) -> bool:
        """Whether the answer (or the error) is in."""
        return self._future.done()

    def then(self, callback: Callable[[Ack], None]) -> None:
        """Call ``callback(self)`` once answered (at once if it is; else on paho's thread)."""
        self._future.add_done_callback(lambda _f: callback(self))

    def settle(self, reasons: list[str | None] | LinkError) -> None:
        if self._future.done():
            return
        if isinstance(reasons, LinkError):
            self._future.set_exception(reasons)
        else:
            self._future.set_result(reasons)


def answer(
    where: str, words: list[str | None], topics: list[str], refusal: type[LinkError] | None
) -> list[str | None] | LinkError:
    """What settles an ``Ack``: the refusal of each filter, or for a PUBLISH the error it raises."""
    if refusal is PublishRefused and words and words[0] is not None:
        return PublishRefused(where, words[0], topics[0])
    return words
