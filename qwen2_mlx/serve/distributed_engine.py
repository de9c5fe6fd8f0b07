"""The engine across the ranks of `mlx.launch`: rank 0 decides each step, every rank runs it on its shard.

Rank 0 listens on HTTP; the other ranks have no clients. At every turn of the engine loop (where the
single-process engine takes submitted jobs, `Engine._receive`) rank 0 writes a `plan`: the requests that
join (prompt ids, budget, sampling with a seed, stop strings, schema), the ones cancelled since the last
turn, and whether to stop. It reaches every rank through `mx.distributed` collectives (`PlanChannel`), and
every rank then runs the same engine code on the same jobs: the same batch inserts and removals, the same
prefix-cache hits, the same seeded samples, the same grammar masks and stop-string ends. So no token id is
ever sent back: every rank picks the same tokens.

The jobs the loop runs are `Mirror`s made from the plan on every rank, so a cancellation is seen at the same
turn everywhere (a client's disconnect sets the real job's event at any moment; rank 0 passes it on at
its next turn). On rank 0 a mirror hands its events to the real job.

A rank that dies or hangs stops the collectives. `Watchdog` ends the process with one line when a turn (a
plan or a model step) takes longer than `rank_timeout`; `mlx.launch` ends the other ranks when one exits
non-zero, and it sends rank 0 SIGTERM when another rank dies, which `close` turns into that line and exit 1.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import sys
import threading
import time
import zlib
from typing import Optional

import mlx.core as mx
import numpy as np

from qwen2_mlx.generation.generate import generation_stream

from .engine import Engine
from .protocol import Job, Sampling

log = logging.getLogger("qwen2_mlx.serve")


class RanksLost(RuntimeError):
    """The other ranks stopped answering: the job cannot go on."""


class RanksOutOfStep(RuntimeError):
    """The ranks no longer run the same collectives: a bug, which ends the job."""


class PlanChannel:
    """Rank 0's plan (a JSON object) to every rank: its byte length `all_sum`-ed, then its bytes (the
    other ranks add zeros). An empty plan, the common case in a decode step, costs only the length."""

    def __init__(self, group):
        self.group = group
        self.lead = group.rank() == 0
        self.turn = 0

    def _sum(self, a: np.ndarray) -> np.ndarray:
        # On the engine's stream (the default inside its loop), behind the model's own collectives: the
        # batch generator evaluates the next step asynchronously, and collectives on two streams could
        # reach the ranks in different orders.
        return np.array(mx.distributed.all_sum(mx.array(a), group=self.group))

    def share(self, plan: Optional[dict]) -> Optional[dict]:
        data = json.dumps(plan, separators=(",", ":")).encode() if self.lead and plan else b""
        # The header also carries every rank's turn count, each in its own slot: ranks out of step (a
        # collective met by a different one elsewhere) are caught here rather than computing garbage.
        self.turn = self.turn % (1 << 30) + 1  # never 0: a 0 is a rank that added nothing
        header = np.zeros(1 + self.group.size(), dtype=np.int32)
        header[0], header[1 + self.group.rank()] = len(data), self.turn
        n, *turns = self._sum(header)
        gone = [r for r, t in enumerate(turns) if t == 0]
        if gone:  # the ring backend gives up on a closed link and fails the collective with zeros
            raise RanksLost(f"rank {gone[0]} is gone (its link closed: it died or its host went away)")
        if any(t != self.turn for t in turns):
            raise RanksOutOfStep(f"rank {self.group.rank()} is at turn {self.turn}, the ranks at {turns}")
        if n == 0:
            return None
        mine = np.frombuffer(data, dtype=np.uint8) if self.lead else np.zeros(int(n), dtype=np.uint8)
        return json.loads(self._sum(mine).tobytes())


class Mirror(Job):
    """A job as the engine loop on every rank sees it; on rank 0 its events go to the client's job."""

    origin: Optional[Job] = None
    uid: int = 0
    digest: int = 0  # a running CRC of the tokens produced: the ranks' logs show they picked the same ones

    def emit(self, event) -> None:
        if self.origin is not None:
            self.origin.cached_tokens, self.origin.generated = self.cached_tokens, self.generated
            self.origin.emit(event)


class Watchdog:
    """Ends this rank with one line when a turn of the engine loop has waited on the others too long."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.since: Optional[float] = None  # when the current turn began; None between turns
        threading.Thread(target=self._watch, name="qwen2-serve-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                fatal(f"rank {self.rank} waited {self.timeout:g} s for the other ranks (one died or hung)")


def leave(code: int) -> None:
    """End this rank now, skipping C++ destructors: the ring backend's can abort once a peer has gone."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fatal(why: str) -> None:
    """One line, then exit 1 at once: a thread blocked in a collective can be neither joined nor woken."""
    print(f"qwen2-serve: error: {why}; ending the job", file=sys.stderr, flush=True)
    leave(1)


class DistributedEngine(Engine):
    """`Engine` whose loop turns are planned by rank 0 and run identically on every rank of `group`."""

    def __init__(self, model, tokenizer, *, group, rank_timeout: float = 600.0, **kwargs):
        super().__init__(model, tokenizer, disk_cache=None, **kwargs)
        if not self.batching:
            raise ValueError(
                "under mlx.launch the server runs a continuous batch only: --lookup, --draft-model, --kv-bits "
                "and a Dual Chunk Attention geometry that is not plain attention are not available"
            )
        self.group, self.rank = group, group.rank()
        self.channel = PlanChannel(group)
        self.watchdog = Watchdog(self.rank, rank_timeout)
        self._mirrors: dict[int, Mirror] = {}
        self._next_uid = 0
        self.slowest = 0.0  # the longest turn so far (seconds), for `close`
        log.info("rank %d of %d: pid %d", self.rank, group.size(), os.getpid())

    # --- rank 0: the plan -----------------------------------------------------------------------
    def _plan(self, block: bool) -> Optional[dict]:
        """New jobs (waiting up to 0.1 s for one when idle), cancellations and a stop, as one plan."""
        jobs, stop = [], False
        try:
            while True:
                job = self._incoming.get(timeout=0.1) if block else self._incoming.get_nowait()
                block = False
                if job is None:
                    stop = True
                    break
                jobs.append(job)
        except queue.Empty:
            pass
        cancel = [uid for uid, m in self._mirrors.items() if m.origin.cancel.is_set() and not m.cancel.is_set()]
        plan = {"jobs": [self._describe(j) for j in jobs], "cancel": cancel, "stop": stop}
        self._new = jobs  # the real jobs, in the order the plan names them
        return plan if jobs or cancel or stop else None

    def _describe(self, job: Job) -> dict:
        s = job.sampling
        if s.temperature > 0 and s.seed is None:  # every rank must draw the same tokens: rank 0 picks the seed
            s = Sampling(s.temperature, s.top_p, s.top_k, s.min_p, random.getrandbits(63))
            job.sampling = s
        self._next_uid += 1
        return {
            "uid": self._next_uid,
            "prompt": list(job.prompt),
            "max_tokens": job.max_tokens,
            "sampling": [s.temperature, s.top_p, s.top_k, s.min_p, s.seed],
            "stop": list(job.stop),
            "schema": job.schema,
            "logprobs": [job.logprobs, job.top_logprobs],
        }

    # --- every rank: the plan applied -------------------------------------------------------------
    def _mirror(self, d: dict, origin: Optional[Job]) -> Mirror:
        grammar = None
        if origin is not None:
            grammar = origin.grammar
        elif d["schema"] is not None:
            from qwen2_mlx.generation.structured import json_schema_processor

            schema = None if d["schema"] is True else d["schema"]
            grammar = json_schema_processor(self.tokenizer, schema, self.model.args.vocab_size)
        logprobs, top = d["logprobs"] if origin is not None else (False, 0)  # only rank 0 answers clients
        m = Mirror(
            prompt=d["prompt"],
            max_tokens=d["max_tokens"],
            sampling=Sampling(*d["sampling"]),
            stop=d["stop"],
            grammar=grammar,
            logprobs=logprobs,
            top_logprobs=top,
        )
        m.origin, m.uid = origin, d["uid"]
        return m

    def _receive(self, waiting: list, block: bool) -> bool:
        """The turn's plan from rank 0, applied: joined jobs into `waiting`, cancellations set; False on stop."""
        if self.watchdog.since is not None:  # the turn that ends here: how long a turn may take
            self.slowest = max(self.slowest, time.monotonic() - self.watchdog.since)
        self.watchdog.since = None  # rank 0 may wait here for a client; the others wait for rank 0
        plan = self._plan(block) if self.rank == 0 else None
        self.watchdog.since = time.monotonic()
        plan = self.channel.share(plan)
        if plan is None:
            return True
        origins = self._new if self.rank == 0 else [None] * len(plan["jobs"])
        for d, origin in zip(plan["jobs"], origins):
            m = self._mirror(d, origin)
            self._mirrors[m.uid] = m
            self._held.add(m)
            waiting.append(m)
        for uid in plan["cancel"]:
            if uid in self._mirrors:
                self._mirrors[uid].cancel.set()
        return not plan["stop"]

    def _token_event(self, a, token: int, logprobs, text: str) -> None:
        self.watchdog.since = time.monotonic()  # progress: a reply going on alone is one long turn
        a.job.digest = zlib.crc32(token.to_bytes(4, "little"), a.job.digest)
        super()._token_event(a, token, logprobs, text)

    def _release(self, job: Job, reason: str) -> None:
        super()._release(job, reason)
        if isinstance(job, Mirror) and self._mirrors.pop(job.uid, None) is not None:
            log.info(
                "rank %d: request %d %s after %d tokens (crc %08x)",
                self.rank,
                job.uid,
                reason,
                job.generated,
                job.digest,
            )

    def _main(self) -> None:
        """The loop; a failure cannot be recovered from on one rank alone, so it ends the job."""
        try:
            with mx.stream(generation_stream):
                self._batch_loop()
        except RanksLost as e:
            fatal(str(e))
        except Exception as e:  # noqa: BLE001 - the ranks can no longer be in step
            log.exception("the engine loop failed on rank %d", self.rank)
            fatal(f"the engine loop failed on rank {self.rank}: {e}")
        self.watchdog.since = None

    # --- lifetime ---------------------------------------------------------------------------------
    def follow(self) -> None:
        """A rank other than 0: run the loop on this thread until rank 0 says stop, then end the process."""
        self._main()
        leave(0)

    def close(self) -> None:
        """Rank 0: tell every rank to stop and end the process; RanksLost if the loop cannot get that far.

        The stop goes out at the loop's next turn, so it may wait for the turn under way: a few seconds
        more than twice the longest turn so far (a big model's long prefill step) before giving up."""
        self._incoming.put(None)
        grace = 3.0 + 2 * self.slowest
        self._thread.join(timeout=grace)
        if self._thread.is_alive():
            raise RanksLost(f"rank 0 waited {grace:.0f} s for the other ranks to stop (one died or hung)")
        leave(0)
