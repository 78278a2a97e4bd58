"""Interactive REPL on rank 0: type a prompt and the answer streams back, with its TTFT and TBT.

    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.repl parallel.kvp=2

Commands:
  /set FIELD VALUE   a sampling field for the next prompts (temperature, top_k, top_p, max_tokens, seed, ...)
  /stats             latency of the answers so far and the engine's state
  /load PATH         the file's text goes before every next prompt (a long context)
  /reset             forget the loaded context and the /set fields (the prefix cache keeps its blocks)
  /clear-cache       empty the prefix cache: the next prompts are prefilled whole
  /quit              leave (so does Ctrl-D)
Ctrl-C cancels the answer in progress (its KV blocks are freed); the job goes on. The other ranks
follow rank 0's plans and exit with it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import sys
import threading
from pathlib import Path

from mnemosyne_hpc.config import Config, compose_command_line
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.request import RequestError, SamplingParams
from mnemosyne_hpc.runtime import run, stopped_at_start
from mnemosyne_hpc.serving.inputs import InputProcessor
from mnemosyne_hpc.serving.loop import ServingLoop, Ticket

HELP = __doc__.split("Commands:\n", 1)[1].split("Ctrl-C", 1)[0]


class Repl:
    def __init__(self, cfg: Config, engine: Engine, out=sys.stdout):
        self.engine, self.out = engine, out
        self.loop = ServingLoop(engine, heartbeat_s=cfg.parallel.timeout_s / 4)
        self.inputs = InputProcessor(engine.tokenizer)
        self.sampling: dict = {}
        self.context = ""
        self.current: Ticket | None = None
        self.ttfts: list[float] = []
        self.tbts: list[float] = []

    def print(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def serve(self) -> None:
        """The loop on this (main) thread; the conversation on another. Once it ends, Ctrl-C is ignored:
        the handler must not keep this REPL, and through it the process groups, alive (runtime._leave)."""
        signal.signal(signal.SIGINT, self._interrupt)
        if stopped_at_start():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.print("interrupted while starting: every rank shuts down")
            return
        conversation = threading.Thread(target=self._converse, name="repl", daemon=True)
        conversation.start()
        try:
            self.loop.run()
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            conversation.join(timeout=5)

    def _interrupt(self, signum, frame) -> None:
        """Takes no lock (it runs on the loop's thread, which may hold one): cancelling sets flags, and
        the hint is written with os.write."""
        if self.current is not None:
            self.loop.cancel(self.current)
        else:
            os.write(self.out.fileno(), b"\n(Ctrl-C cancels an answer; /quit or Ctrl-D leaves)\n> ")

    def _converse(self) -> None:
        self.print(
            f"mnemosyne-hpc REPL: {self.engine.args.architecture}, {self.engine.runner.ctx.mesh.size()} "
            "ranks. /help lists the commands."
        )
        try:
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                if line.strip() in ("/quit", "/exit"):
                    break
                if line.startswith("/"):
                    self._command(line.strip())
                elif line.strip():
                    self._answer(self.context + line)
        finally:
            self.loop.stop()

    def _command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        if name == "/help":
            self.print(HELP)
        elif name == "/set":
            field, _, value = rest.strip().partition(" ")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            candidate = {**self.sampling, field: parsed}
            try:
                SamplingParams.from_request(self.engine.cfg.sampling, candidate)
            except ValueError as e:
                self.print(f"error: {e}")
                return
            self.sampling = candidate
            self.print(f"sampling: {self.sampling}")
        elif name == "/load":
            try:
                self.context = Path(rest.strip()).expanduser().read_text()
            except OSError as e:
                self.print(f"error: {e}")
                return
            tokens = len(self.inputs.prompt_tokens(self.context)) if self.engine.tokenizer else 0
            self.print(f"loaded {len(self.context)} characters ({tokens} tokens) as the context of the next prompts")
        elif name == "/reset":
            self.context, self.sampling = "", {}
            self.print("context and sampling fields reset")
        elif name == "/clear-cache":
            self.loop.call(self.engine.placement.clear_cache)
            self.print("prefix cache cleared")
        elif name == "/stats":
            self._stats()
        else:
            self.print(f"unknown command {name}; /help lists the commands")

    def _answer(self, prompt: str) -> None:
        try:  # on this conversation thread, not the one driving the ranks
            token_ids = self.inputs.prompt_tokens(prompt)
        except RequestError as e:
            self.print(f"error: {e}")
            return
        events: queue.Queue = queue.Queue()
        self.current = self.loop.submit(events.put, prompt_token_ids=token_ids, sampling=self.sampling)
        while True:
            event = events.get()
            if event.kind == "error":
                self.print(f"error: {event.text}")
                break
            self.print(event.text, end="")
            if event.kind == "done":
                request = event.request
                if request.ttft_s is not None:
                    self.ttfts.append(request.ttft_s)
                self.tbts += request.tbt_s
                tbt = f", TBT median {1000 * statistics.median(request.tbt_s):.1f} ms" if request.tbt_s else ""
                ttft = f"TTFT {1000 * request.ttft_s:.0f} ms" if request.ttft_s is not None else "no token"
                self.print(
                    f"\n[{ttft}{tbt}, {len(request.output_token_ids)} tokens, {event.finish_reason}] prompt "
                    f"{len(request.prompt_token_ids)} tokens, {request.cached_tokens} of them cached"
                )
                break
        self.current = None

    def _stats(self) -> None:
        scheduler = self.engine.scheduler
        placement = scheduler.placement
        self.print(
            f"answers: {len(self.ttfts)}; TTFT median "
            f"{1000 * statistics.median(self.ttfts) if self.ttfts else 0:.0f} ms; TBT median "
            f"{1000 * statistics.median(self.tbts) if self.tbts else 0:.1f} ms over {len(self.tbts)} gaps"
        )
        self.print(
            f"engine: {len(scheduler.running)} running, {len(scheduler.waiting)} waiting, KV blocks "
            f"{placement.blocks_in_use}/{placement.total_blocks}; sampling {self.sampling or 'defaults'}"
            f"; context {len(self.context)} characters"
        )


def main(argv: list[str] | None = None) -> None:
    cfg = compose_command_line(argv)
    run(cfg, lambda engine: Repl(cfg, engine).serve(), stop_signals=(signal.SIGINT,))


if __name__ == "__main__":
    main()
