"""The engine in a process of its own: what a Serve replica runs, so that HTTP and decoding do not
share one Python lock.

In one process, the engine thread and the replica's event loops (HTTP, SSE, Ray Serve's own
threads) take turns holding the GIL between kernels: on a 2-core machine at 32 streams the engine
thread ran only about 70% of the time while a core sat idle, and the engine made about 60% of the
tokens/s it makes alone. So the replica keeps the request side (`RequestFrontend`: tokenizer, chat
template, checks) and starts the engine in a child process, joined by a socket pair:

    replica (EngineProcess)                      child (`python -m raylm.inference.engine_process`)
      submit  -> ("submit", [(id, prompt ids, params)])   queued into the Engine
      cancel  -> ("cancel", [id])                          marked; freed at the next step
      stats() -> ("stats", token)                          <- ("stats", token, the engine's stats)
                 <- ("outputs", [(id, Output)])            once per step, every request's output
                 <- ("failed", message)                    a step raised: all its requests got `error`

The child steps whenever it has work and reads commands between steps, in one thread. It ends
when told to stop, when a step fails (after answering every request with an `error` output), or
when the replica is gone (its end of the socket closes). The replica's reader thread hands outputs
to the streams; when the child ends unasked (killed by the kernel's OOM killer, say), every open
request gets an `error` output, later ones are refused (EngineFailed), and `alive()` turns False,
which the replica reports as unhealthy so that Serve replaces it.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from raylm.core.errors import UserError
from raylm.inference.engine import (
    Engine,
    EngineConfig,
    EngineFailed,
    EngineStreams,
    RequestFrontend,
)
from raylm.inference.sampling import SamplingParams
from raylm.inference.sequence import ERROR, Output

log = logging.getLogger(__name__)


def error_output(prompt_tokens: int = 0, completion_tokens: int = 0) -> Output:
    return Output("", [], [], ERROR, prompt_tokens, completion_tokens)


# ---- the child ------------------------------------------------------------------------------------


def run_engine(engine: Engine, conn: Connection) -> str | None:
    """Step `engine` for the requests that come over `conn` until told to stop (returns None), the
    other end closes (returns None) or a step fails (returns its message, already sent)."""
    seqs: dict[int, object] = {}  # request id -> its Sequence, until it finishes
    outputs: list[tuple[int, Output]] = []  # this step's, sent together after it

    def collect(rid: int, out: Output) -> None:
        outputs.append((rid, out))
        if out.finish_reason is not None:
            seqs.pop(rid, None)

    while True:
        try:
            wait = None if not engine.has_work() else 0  # idle: block until a command (or EOF) comes
            while conn.poll(wait):
                wait = 0
                kind, payload = conn.recv()
                if kind == "stop":
                    return None
                if kind == "submit":
                    for rid, prompt_ids, params in payload:
                        try:
                            seqs[rid] = engine.submit(prompt_ids, params, lambda out, rid=rid: collect(rid, out))
                        except Exception:  # the replica checked it; if the engine still refuses it, it fails alone
                            log.exception("the engine refused request %d", rid)
                            outputs.append((rid, error_output(len(prompt_ids))))
                elif kind == "cancel":
                    for rid in payload:
                        if rid in seqs:
                            engine.cancel(seqs[rid])
                elif kind == "stats":
                    conn.send(("stats", (payload, engine.stats())))
        except (EOFError, OSError):  # the replica is gone
            return None
        failure = None
        if engine.has_work():
            try:
                engine.step()
            except Exception as err:  # Engine.step has answered every request with an `error` output
                log.exception("an engine step failed; every request in it failed")
                failure = f"{type(err).__name__}: {err}"
        try:
            if outputs:
                conn.send(("outputs", outputs))
                outputs = []
            if failure is not None:
                conn.send(("failed", failure))
                return failure
        except (EOFError, OSError):
            return None


def child_main(fd: int) -> int:
    # Warnings and failures only: the replica prints what the engine got when it starts.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    conn = Connection(fd)
    model_dir, config = conn.recv()
    try:
        engine = Engine(model_dir, config)
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready", {"device": str(engine.device), "kv_cache": engine.kv_cache.describe()}))
    return 1 if run_engine(engine, conn) else 0


# ---- the replica's side ---------------------------------------------------------------------------


class EngineProcess(EngineStreams):
    """An Engine in a child process, with asyncio streams over it (see the module's docstring).

    Starting it loads the model in the child and returns once the engine is ready (its device and
    KV cache in `self.ready`), or raises with the child's reason.
    """

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        super().__init__()
        config = config or EngineConfig()
        config.validate()
        self.frontend = RequestFrontend(model_dir, config.max_model_len)
        ours, theirs = socket.socketpair()
        # The child imports what this process can (a Ray runtime_env's modules included), from anywhere.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self.process = subprocess.Popen([sys.executable, "-m", "raylm.inference.engine_process", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((str(model_dir), config))
        self.lock = threading.Lock()  # one sender at a time; and submit vs the reader's failing of everything
        self.listeners: dict[int, Callable[[Output], None]] = {}
        self.ids = itertools.count()
        self.stats_replies: dict[int, dict] = {}  # stats token -> the child's answer, until its asker takes it
        self.stats_ready = threading.Condition(self.lock)
        self.stopping = False
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            kind, payload = "failed", f"it exited with code {self.process.wait()}"
        if kind != "ready":
            self.process.wait()
            raise UserError(f"the engine process did not start: {payload}")
        self.ready = payload
        self.reader = threading.Thread(target=self.read, name="raylm-engine-reader", daemon=True)
        self.reader.start()

    def read(self) -> None:
        """Hand the child's outputs to their requests until it ends; then fail whatever is open."""
        reason = None
        try:
            while True:
                kind, payload = self.conn.recv()
                if kind == "outputs":
                    for rid, out in payload:
                        listener = self.listeners.get(rid) if out.finish_reason is None else self.listeners.pop(rid, None)
                        if listener is not None:  # None: cancelled meanwhile
                            listener(out)
                elif kind == "stats":
                    with self.lock:
                        token, stats = payload
                        self.stats_replies[token] = stats
                        self.stats_ready.notify_all()
                elif kind == "failed":
                    reason = f"the engine stopped after a failed step ({payload})"
                    break
        except (EOFError, OSError):  # its end closed: it has exited, or is about to
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
            reason = f"the engine process exited ({f'killed by signal {-code}' if code < 0 else f'code {code}'})"
        with self.lock:
            if self.failure is None:
                self.failure = EngineFailed(reason)
                if not self.stopping:
                    log.error("%s: its requests failed, and it takes no more (the replica reports unhealthy)", reason)
            listeners, self.listeners = self.listeners, {}
            self.stats_ready.notify_all()
        for listener in listeners.values():
            try:
                listener(error_output())
            except Exception:  # a consumer that is gone must not keep the others from hearing
                log.exception("telling a request that the engine failed did not work")

    def send(self, message) -> None:
        """Send while holding self.lock; a child that is gone fails the request in `read`."""
        try:
            self.conn.send(message)
        except OSError:
            pass

    def submit(self, requests: list[tuple[list[int], SamplingParams]], on_output: Callable[[int, Output], None]) -> list[int]:
        for prompt_ids, params in requests:
            self.frontend.check_request(prompt_ids, params)
        with self.lock:
            if self.failure is not None:
                raise self.failure
            ids = [next(self.ids) for _ in requests]
            for i, rid in enumerate(ids):
                self.listeners[rid] = lambda out, i=i: on_output(i, out)
            # Sent together, a request's choices are queued back to back and share their prompt's blocks.
            self.send(("submit", [(rid, prompt_ids, params) for rid, (prompt_ids, params) in zip(ids, requests)]))
        return ids

    def cancel(self, handles: list[int]) -> None:
        with self.lock:
            for rid in handles:
                self.listeners.pop(rid, None)
            if self.failure is None:
                self.send(("cancel", handles))

    def stats(self) -> dict:
        """The engine's stats, asked of the child (a step's wait at most). EngineFailed once it has
        ended: a replica whose engine is gone has no figures to give, only the reason."""
        with self.lock:
            if self.failure is None:
                token = next(self.ids)
                self.send(("stats", token))
                self.stats_ready.wait_for(lambda: token in self.stats_replies or self.failure is not None, timeout=30)
                if token in self.stats_replies:
                    return self.stats_replies.pop(token)
            raise self.failure or EngineFailed("the engine process did not answer for 30 s")

    def alive(self) -> bool:
        return self.failure is None and self.process.poll() is None

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.send(("stop", None))
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=5)


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
