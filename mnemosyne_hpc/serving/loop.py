"""Rank 0's serving loop: the engine steps on one thread; any other thread submits requests and
receives their text as events.

While there is no work the loop sleeps on its inbox (no CPU spent) and, every `heartbeat_s`, sends
the other ranks an empty plan, so their wait for the next plan never reaches parallel.timeout_s.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.request import Request, RequestError


@dataclass
class Event:
    kind: str  # "text": new text of the request; "done": it finished; "error": it was rejected
    text: str = ""
    status: int = 400  # of an "error": the HTTP status it means
    finish_reason: Optional[str] = None
    request: Optional[Request] = None  # with "done": token counts and times


@dataclass
class Ticket:
    """A submitted request, as its submitter knows it."""

    on_event: Callable[[Event], None]
    request: dict
    request_id: Optional[int] = None
    cancelled: bool = False


@dataclass
class ServingLoop:
    engine: Engine
    heartbeat_s: float
    _inbox: queue.Queue = field(default_factory=queue.Queue)
    _tickets: dict = field(default_factory=dict)  # request id → Ticket
    _stopping: threading.Event = field(default_factory=threading.Event)
    observers: list = field(default_factory=list)  # called with every finished request (on the loop's thread)

    def submit(self, on_event: Callable[[Event], None], **request) -> Ticket:
        """Queue a request (thread-safe). `on_event` is called on the loop's thread."""
        ticket = Ticket(on_event, request)
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Thread-safe; a cancelled request is aborted and frees its KV blocks."""
        ticket.cancelled = True
        self._inbox.put(ticket)

    def call(self, function: Callable[[], None]) -> None:
        """Run `function` on the loop's thread between steps, after what was submitted before (thread-safe)."""
        self._inbox.put(function)

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)

    @property
    def idle(self) -> bool:
        return not self.engine.has_unfinished and self._inbox.empty()

    def run(self) -> None:
        """Serve until `stop()`: the caller's thread does every collective of rank 0."""
        last_contact = time.monotonic()
        while not self._stopping.is_set():
            self._take_inbox(block=not self.engine.has_unfinished, until=last_contact + self.heartbeat_s)
            if self.engine.has_unfinished:
                out = self.engine.step()
                self._emit(out.sampled, out.finished)
                last_contact = time.monotonic()
            elif time.monotonic() >= last_contact + self.heartbeat_s:
                self.engine.keep_alive()
                last_contact = time.monotonic()

    def _take_inbox(self, block: bool, until: float) -> None:
        while True:
            try:
                timeout = max(until - time.monotonic(), 0.0) if block else None
                ticket = self._inbox.get(block=block and timeout > 0, timeout=timeout)
            except queue.Empty:
                return
            block = False  # after the first arrival, take only what is already there
            if ticket is None:
                continue
            if not isinstance(ticket, Ticket):
                ticket()  # a `call`
                continue
            if ticket.cancelled:  # its cancellation; a request cancelled before it was taken never starts
                finished = self.engine.abort(ticket.request_id) if ticket.request_id is not None else None
                self._emit([], [finished] if finished else [])
                continue
            try:
                ticket.request_id = self.engine.add_request(**ticket.request)
                self._tickets[ticket.request_id] = ticket
            except RequestError as e:
                ticket.on_event(Event("error", text=str(e)))
            except Exception as e:  # noqa: BLE001 - one request's failure must not end the job
                ticket.on_event(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))

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
            ticket.on_event(Event("done", finish_reason=request.finish_reason, request=request))

    @staticmethod
    def _send_text(ticket: Ticket, request: Request) -> None:
        text = request.output.take() if request.output is not None else ""
        if text:
            ticket.on_event(Event("text", text=text))
