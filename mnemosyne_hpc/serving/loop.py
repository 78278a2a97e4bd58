"""Rank 0's serving loop: the engine steps on one thread; any other thread submits requests and
receives their text as events.

While there is no work the loop sleeps on its inbox (no CPU spent) and, every `heartbeat_s`, sends
the other ranks an empty plan, so their wait for the next plan never reaches parallel.timeout_s.

A stop (`stop`, also from a signal handler) refuses new requests at once and lets those submitted
finish within a grace period; whatever is left then ends with an error event, as does every request
when a step fails (a rank lost): no client is left with a cut connection and no answer.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.request import Request, RequestError

POLL_S = 0.25  # while waiting for work, how soon the loop notices a stop
REFUSED = "the server is shutting down and accepts no new requests"
ENDED = "the server is shutting down: this request did not finish within its grace period"


@dataclass
class Event:
    kind: str  # "text": new text of the request; "done": it finished; "error": it was rejected
    text: str = ""
    status: int = 400  # of an "error": the HTTP status it means
    finish_reason: Optional[str] = None
    request: Optional[Request] = None  # the request (with "done": its token counts and times)
    logprobs: list = field(default_factory=list)  # TokenLogprob of each output token since the last event


@dataclass
class Ticket:
    """A submitted request, as its submitter knows it."""

    on_event: Callable[[Event], None]
    request: dict
    request_id: Optional[int] = None
    cancelled: bool = False
    logprobs_sent: int = 0  # of the request's output_logprobs


@dataclass
class ServingLoop:
    engine: Engine
    heartbeat_s: float
    _inbox: queue.Queue = field(default_factory=queue.Queue)
    _tickets: dict = field(default_factory=dict)  # request id → Ticket
    _cancelled: bool = False  # some ticket was cancelled since the loop last looked
    _deadline: Optional[float] = None  # once stopping: when the requests still running are ended
    # (waiting for work, since when): the loop's last sign of progress (stalled_s)
    _progress: tuple = field(default_factory=lambda: (True, time.monotonic()))
    observers: list = field(default_factory=list)  # called with every finished request (on the loop's thread)

    def submit(self, on_event: Callable[[Event], None], **request) -> Ticket:
        """Queue a request (thread-safe). `on_event` is called on the loop's thread."""
        ticket = Ticket(on_event, request)
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Thread-safe and lock-free (a signal handler may call it, whatever this thread holds): the
        request is aborted before the next step and frees its KV blocks; one not started never starts."""
        ticket.cancelled = True
        self._cancelled = True  # after the ticket's flag: the loop clears this before it looks at them

    def call(self, function: Callable[[], None]) -> None:
        """Run `function` on the loop's thread between steps, after what was submitted before (thread-safe)."""
        self._inbox.put(function)

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests from now on; those submitted may run `grace_s` seconds more, then those
        left end with an error event and `run` returns. A second call ends them at once. It takes no
        lock, so a signal handler may call it while this thread holds one: the loop notices within POLL_S."""
        now = time.monotonic()
        self._deadline = now if self.stopping else now + grace_s

    @property
    def stopping(self) -> bool:
        return self._deadline is not None

    @property
    def idle(self) -> bool:
        return not self.engine.has_unfinished and self._inbox.empty()

    def stalled_s(self) -> float:
        """Seconds the loop has had work without completing a step (0 while it waits for work): a rank
        frozen or slowed to a crawl shows here long before parallel.timeout_s ends the job."""
        waiting, since = self._progress
        return 0.0 if waiting else time.monotonic() - since

    def run(self) -> None:
        """Serve until stopped: the caller's thread does every collective of rank 0. A step that raises
        ends every request with an error event, then propagates."""
        try:
            self._serve()
        except BaseException as e:
            self._end_all(f"the server failed and stops: {type(e).__name__}: {e}", 500)
            raise

    def _serve(self) -> None:
        last_contact = time.monotonic()
        while True:
            waiting = not self.engine.has_unfinished
            if waiting:
                self._progress = (True, time.monotonic())
            self._take_inbox(block=waiting, until=min(last_contact + self.heartbeat_s, time.monotonic() + POLL_S))
            if waiting:
                self._progress = (False, time.monotonic())
            self._abort_cancelled()
            if self.stopping and (not self._tickets or time.monotonic() >= self._deadline):
                self._end_all(ENDED, 503)
                return
            if self.engine.has_unfinished:
                out = self.engine.step()
                self._progress = (False, time.monotonic())
                self._emit(out.sampled, out.finished)
                last_contact = time.monotonic()
            elif time.monotonic() >= last_contact + self.heartbeat_s:
                self.engine.keep_alive()
                last_contact = time.monotonic()

    def _end_all(self, message: str, status: int) -> None:
        """Every request still running, or still in the inbox, ends with an error event."""
        ending = list(self._tickets.values())
        self._tickets.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Ticket) and not item.cancelled:
                ending.append(item)
        for ticket in ending:
            ticket.on_event(Event("error", text=message, status=status))

    def _take_inbox(self, block: bool, until: float) -> None:
        while True:
            try:
                timeout = max(until - time.monotonic(), 0.0) if block else None
                ticket = self._inbox.get(block=block and timeout > 0, timeout=timeout)
            except queue.Empty:
                return
            block = False  # after the first arrival, take only what is already there
            if not isinstance(ticket, Ticket):
                ticket()  # a `call`
                continue
            if ticket.cancelled:  # before it started: it never does
                continue
            if self.stopping:
                ticket.on_event(Event("error", text=REFUSED, status=503))
                continue
            try:
                ticket.request_id = self.engine.add_request(**ticket.request)
                self._tickets[ticket.request_id] = ticket
            except RequestError as e:
                ticket.on_event(Event("error", text=str(e)))
            except Exception as e:  # noqa: BLE001 - one request's failure must not end the job
                ticket.on_event(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))

    def _abort_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._cancelled = False
        for ticket in [t for t in self._tickets.values() if t.cancelled]:
            finished = self.engine.abort(ticket.request_id)
            self._emit([], [finished] if finished else [])

    def _emit(self, sampled: list[Request], finished: list[Request]) -> None:
        for request in sampled:
            ticket = self._tickets.get(request.id)
            if ticket is not None:
                self._send_text(ticket, request)
        for request in finished:
            for observe in self.observers:
                observe(request)
            ticket = self._tickets.pop(request.id, None)
            if ticket is None:
                continue
            if not isinstance(ticket, Ticket):
                ticket()  # a `call`
                continue
            self._send_text(ticket, request)
            logprobs = _new_logprobs(ticket, request)
            ticket.on_event(Event("done", finish_reason=request.finish_reason, request=request, logprobs=logprobs))

    @staticmethod
    def _send_text(ticket: Ticket, request: Request) -> None:
        """New text, with the log-probabilities of the tokens since the last (text held back keeps
        them for the event that releases it)."""
        text = request.output.take() if request.output is not None else ""
        if text:
            ticket.on_event(Event("text", text=text, request=request, logprobs=_new_logprobs(ticket, request)))


def _new_logprobs(ticket: Ticket, request: Request) -> list:
    new = request.output_logprobs[ticket.logprobs_sent :]
    ticket.logprobs_sent = len(request.output_logprobs)
    return new
