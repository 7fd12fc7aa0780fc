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
      stats() -> ("stats", token)                          <- ("stats", (token, the engine's stats))
                 <- ("outputs", [(id, Output)])            once per step, every request's output
                 <- ("failed", message)                    a step raised: all its requests got `error`

The child steps whenever it has work and reads commands between steps, in one thread. It ends
when told to stop, when a step fails (after answering every request with an `error` output), or
when the replica is gone: a thread of the child watches a pipe whose other end only the replica
holds, so the child exits at once however the replica ended, even in the middle of a step or of
loading the model (a GPU's memory is then free for the replica that replaces it). The replica's
reader thread hands outputs to the streams; when the child ends unasked (killed by the kernel's OOM killer, say), every open
request gets an `error` output, later ones are refused (EngineFailed), and `alive()` turns False,
which the replica reports as unhealthy so that Serve replaces it.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
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
                        if (seq := seqs.pop(rid, None)) is not None:  # retired at the next step, with no output
                            engine.cancel(seq)
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


def exit_when_the_replica_ends(watch_fd: int) -> None:
    """The replica never writes to this pipe: its end closes when the replica ends, however it ends."""
    while os.read(watch_fd, 1):
        pass
    os._exit(1)


def child_main(fd: int, watch_fd: int) -> int:
    # Warnings and failures only: the replica prints what the engine got when it starts.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=exit_when_the_replica_ends, args=(watch_fd,), daemon=True).start()
    conn = Connection(fd)
    try:
        model_dir, config = conn.recv()
        try:
            engine = Engine(model_dir, config)
        except Exception as err:
            conn.send(("failed", f"{type(err).__name__}: {err}"))
            return 1
        conn.send(("ready", {"device": str(engine.device), "kv_cache": engine.kv_cache.describe()}))
    except (EOFError, OSError):  # the replica went away while the model loaded
        return 1
    return 1 if run_engine(engine, conn) else 0


# ---- the replica's side ---------------------------------------------------------------------------


class EngineProcess(EngineStreams):
    """An Engine in a child process, with asyncio streams over it (see the module's docstring).

    Starting it loads the model in the child and returns once the engine is ready (its device and
    KV cache in `self.ready`), or raises with the child's reason. No caller ever waits on the
    socket: messages to the child are pickled by the caller (so a bad one fails there) and written
    by a writer thread; a reader thread takes the child's messages. `self.lock` guards only the
    request table, the stats answers and the failure, and is never held across I/O: the child may
    be blocked sending a large step's outputs while this side is blocked sending it a large
    request, and both must go on.
    """

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        super().__init__()
        config = config or EngineConfig()
        config.validate()
        self.frontend = RequestFrontend(model_dir, config.max_model_len)
        ours, theirs = socket.socketpair()
        # The child watches the read end of this pipe; its write end closes only when this process
        # ends (however it ends), and then the child exits at once, even mid-step or mid-load.
        watch_read, self.watch_write = os.pipe()
        # The child imports what this process can (a Ray runtime_env's modules included), from anywhere.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "raylm.inference.engine_process", str(theirs.fileno()), str(watch_read)],
            pass_fds=[theirs.fileno(), watch_read], env=env,
        )
        theirs.close()
        os.close(watch_read)
        self.conn = Connection(ours.detach())
        self.lock = threading.Lock()
        self.listeners: dict[int, Callable[[Output], None]] = {}  # request id -> its stream's callback, until it finishes
        self.ids = itertools.count()
        self.stats_answers: dict[int, dict | None] = {}  # stats token -> the child's answer (None while awaited)
        self.stats_ready = threading.Condition(self.lock)
        self.stopping = False
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        try:
            self.conn.send((str(model_dir), config))
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            kind, payload = "failed", None
        if kind != "ready":
            self.conn.close()
            code = self.process.wait()
            os.close(self.watch_write)
            raise UserError(f"the engine process did not start: {payload or f'it exited with code {code}'}")
        self.ready = payload
        self.writer = threading.Thread(target=self.write, name="raylm-engine-writer", daemon=True)
        self.reader = threading.Thread(target=self.read, name="raylm-engine-reader", daemon=True)
        self.writer.start()
        self.reader.start()

    def post(self, message) -> None:
        """Queue a message for the child (pickled here, so a bad one fails its caller)."""
        self.outbox.put(ForkingPickler.dumps(message))

    def write(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:  # the child is gone; the reader fails what is open
                return

    def read(self) -> None:
        """Hand the child's outputs to their requests until it ends; then fail whatever is open."""
        reason = "the engine's reader stopped on an unexpected error"
        try:
            while True:
                kind, payload = self.conn.recv()
                if kind == "outputs":
                    for rid, out in payload:
                        with self.lock:
                            listener = self.listeners.get(rid) if out.finish_reason is None else self.listeners.pop(rid, None)
                        if listener is not None:  # None: cancelled meanwhile
                            self.deliver(rid, listener, out)
                elif kind == "stats":
                    token, stats = payload
                    with self.lock:
                        if token in self.stats_answers:  # else its asker gave up waiting
                            self.stats_answers[token] = stats
                            self.stats_ready.notify_all()
                elif kind == "failed":
                    reason = f"the engine stopped after a failed step ({payload})"
                    break
        except (EOFError, OSError):  # its end closed: it has exited, or is about to
            code = self.reap()
            reason = f"the engine process exited ({f'killed by signal {-code}' if code < 0 else f'code {code}'})"
        except Exception:
            log.exception("reading the engine's messages failed")
        finally:
            self.fail_open(reason)

    def deliver(self, rid: int, listener: Callable[[Output], None], out: Output) -> None:
        try:
            listener(out)
        except Exception:  # a consumer that is gone (its event loop closed) must not stop the others'
            log.exception("delivering output of request %d failed; cancelling it", rid)
            self.cancel([rid])

    def fail_open(self, reason: str) -> None:
        """Refuse what comes next and answer every open request with an `error` output."""
        with self.lock:
            if self.failure is None:
                self.failure = EngineFailed(reason)
                if not self.stopping:
                    log.error("%s: its requests failed, and it takes no more (the replica reports unhealthy)", reason)
            listeners, self.listeners = self.listeners, {}
            self.stats_ready.notify_all()
        for rid, listener in listeners.items():
            self.deliver(rid, listener, error_output())
        self.outbox.put(None)  # the writer ends
        self.reap()

    def reap(self) -> int:
        """The child's exit code, waiting a little for it (and killing it when it will not go)."""
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def refusal(self) -> EngineFailed:
        return EngineFailed(str(self.failure))  # a fresh one each time: a shared one would collect every raiser's traceback

    def submit(self, requests: list[tuple[list[int], SamplingParams]], on_output: Callable[[int, Output], None]) -> list[int]:
        for prompt_ids, params in requests:
            self.frontend.check_request(prompt_ids, params)
        with self.lock:
            if self.failure is not None:
                raise self.refusal()
            ids = [next(self.ids) for _ in requests]
            # Sent together, a request's choices are queued back to back and share their prompt's blocks.
            self.post(("submit", [(rid, prompt_ids, params) for rid, (prompt_ids, params) in zip(ids, requests)]))
            for i, rid in enumerate(ids):
                self.listeners[rid] = lambda out, i=i: on_output(i, out)
        return ids

    def cancel(self, handles: list[int]) -> None:
        with self.lock:
            for rid in handles:
                self.listeners.pop(rid, None)
            if self.failure is None:
                self.post(("cancel", list(handles)))

    def stats(self, timeout_s: float = 30.0) -> dict:
        """The engine's stats, asked of the child (a step's wait at most). EngineFailed once it has
        ended (a replica whose engine is gone has no figures to give, only the reason);
        TimeoutError when it does not answer in `timeout_s`."""
        with self.lock:
            if self.failure is not None:
                raise self.refusal()
            token = next(self.ids)
            self.stats_answers[token] = None
            self.post(("stats", token))
            self.stats_ready.wait_for(lambda: self.stats_answers[token] is not None or self.failure is not None, timeout=timeout_s)
            stats = self.stats_answers.pop(token)
            if stats is not None:
                return stats
            if self.failure is not None:
                raise self.refusal()
        raise TimeoutError(f"the engine process did not answer for {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.failure is None and self.reader.is_alive() and self.process.poll() is None

    def stop(self) -> None:
        if self.conn.closed:  # stopped already
            return
        with self.lock:
            self.stopping = True
            if self.failure is None:
                self.post(("stop", None))
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.reader.join(timeout=15)
        self.conn.close()
        os.close(self.watch_write)


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2])))
