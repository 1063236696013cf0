"""The generation engine behind the server: one thread, one model, continuous batching.

One thread owns the model and a KV cache with ``max_batch`` rows (:meth:`Llama.new_cache`); every row
keeps its own fill length, so rows hold sequences of different lengths side by side. The thread loops:

1. **admit** — queued jobs take free rows (a job with ``n`` choices takes ``n`` rows at once);
2. **prefill** — the prompts of admitted jobs go through the model together, in one forward call over
   their rows (:meth:`Runner.prefill_rows`: ragged, right-padded, each row written after its own
   length), up to ``prefill_chunk`` tokens per step counting the padding. A job's prompt is prefilled
   once; for ``n > 1`` its cache row is then copied to the other ``n - 1`` rows. A prompt longer than
   ``prefill_chunk`` is cut into chunks, so the running sequences keep decoding between chunks. If the
   batched call raises, each prompt is retried alone, and only the one that fails alone fails;
3. **decode** — one token for every running sequence in a single batched forward call
   (``cache_rows`` = their rows, each appended after its own length), then each row samples with its
   own :class:`~llamalab.generation.sampling.SamplingParams`, generator and penalty counts, and hands
   the token to its :class:`~llamalab.generation.sequence.SequenceState` — the same per-sequence state
   ``generate`` keeps — which decides stop tokens, stop strings and ``max_tokens`` and releases the text.

A finished or cancelled sequence frees its row at once (``cache.reset([row])``) and the next queued
job takes it between two decode steps, instead of waiting for the whole batch to finish (Yu et al.,
2022, "Orca", OSDI'22, calls this iteration-level scheduling).

Results leave the thread through a per-job ``sink`` callable (the HTTP layer hands in one that puts
events on its asyncio queue). A job that fails — in prefill, in sampling, in detokenization, or a
batched forward call that raises (then each row is retried alone to find the culprit) — gets an
:class:`Failed` event; the others carry on. The queue is bounded: :meth:`Engine.submit` raises
:class:`QueueFull` when it holds ``max_queue`` jobs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llamalab.generation.runner import Runner
from llamalab.generation.sampling import SamplingParams, TokenCounts, sample
from llamalab.generation.sequence import SequenceState

log = logging.getLogger("llamalab.server.run")


class QueueFull(Exception):
    """The engine's queue is full; try again later (HTTP 429)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class Delta:
    """New output of one choice: text safe to send, the tokens behind it, and the finish reason once done."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Failed:
    """The job failed inside the engine; ``message`` says why (HTTP 500 or a stream error event)."""

    message: str


@dataclass
class GenOptions:
    """What one job asks for, besides its sampling parameters."""

    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    n: int = 1
    first_index: int = 0  # choice index of the first of the n sequences


class _Choice:
    """One choice being generated in one cache row: its :class:`SequenceState` plus where it runs."""

    def __init__(self, job: Job, index: int, row: int, tok, device: torch.device | str = "cpu") -> None:
        self.job = job
        self.index = index  # the choice's index in the response
        self.row = row  # its KV-cache row
        self.state = SequenceState(job.prompt_ids, job.params_for(index), tok, max_new_tokens=job.opts.max_tokens,
                                   stop=job.opts.stop, stop_token_ids=job.opts.stop_token_ids, device=device)
        self.next_input: int | None = None  # last sampled token, fed at the next decode step

    @property
    def finished(self) -> bool:
        return self.state.finished


class Job:
    """A prompt and how to continue it (``n`` choices). ``cancel()`` stops it from any thread."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, opts: GenOptions,
                 sink: Callable[[Delta | Failed], None]) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.opts = opts
        self.sink = sink
        self.cancelled = False
        self.done = False
        self.prefilled = 0  # prompt tokens already in the cache
        self.rows: list[int] = []
        self.seqs: list[_Choice] = []
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def params_for(self, index: int) -> SamplingParams:
        """Each of the n choices gets its own seed (seed + i), so seeded choices differ yet reproduce."""
        i = index - self.opts.first_index
        if i == 0 or self.params.seed is None:
            return self.params
        p = SamplingParams(**{**self.params.__dict__, "seed": self.params.seed + i})
        return p


class Engine:
    """Continuous-batching generation over one model; run :meth:`start` once, then :meth:`submit` jobs."""

    def __init__(self, model, tok, max_batch: int = 8, max_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, compile: bool | None = False, threads: int | None = None) -> None:
        self.model = model.eval()
        # the engine thread's intra-op threads (default: as many as the constructing thread has), set in
        # that thread: the engine thread does all the server's heavy tensor work (see _loop)
        self.threads = threads or torch.get_num_threads()
        self.tok = tok
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.vocab_size = model.config.vocab_size
        self.device = model.device
        # the model's own forward for prefill and decode; the decode step compiled only when asked
        # (compile=None: as generate decides), since a batch of every row is not measured to pay yet
        self.runner = Runner(model, max_batch, self.max_len, compile=compile)
        self.cache = self.runner.cache
        self.counts = TokenCounts(max_batch, self.vocab_size, device=model.device)
        self._free = list(range(max_batch))
        self._queue: collections.deque[Job] = collections.deque()
        self._prefilling: list[Job] = []
        self._running: list[_Choice] = []
        self._cond = threading.Condition()
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps taken (for tests and stats)
        self.max_running = 0  # most sequences decoded in one step

    # ----------------------------------------------------------------- public
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llamalab-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        """Stop taking steps (jobs queue up); for maintenance and tests."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all or none); raises :class:`QueueFull` when they do not fit."""
        with self._cond:
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._queue)} requests queued (limit {self.max_queue})")
            self._queue.extend(jobs)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running) + sum(j.opts.n for j in self._prefilling),
                    "queued": len(self._queue), "max_batch": self.max_batch, "max_len": self.max_len,
                    "decode_steps": self.steps}

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        # OpenMP's thread count is per thread: a new thread starts at the process default, not at what the
        # constructing thread set. (`llamalab serve` keeps its main thread at one so that only this thread
        # has an OpenMP team: with two teams on a machine of few cores, libgomp shortens its spin-wait and
        # every parallel region wakes sleeping workers; measured on 2 cores, SmolLM2 decode in a second
        # thread at 2 threads: ~30 tok/s with the main thread's team alive, ~67 without, docs/serving.md.)
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and (self._paused or not (self._queue or self._prefilling or self._running)):
                        self._cond.wait()
                    if self._stop:
                        break
                    self._drop_cancelled()
                    self._admit()
                try:
                    self._prefill_some()
                    self._decode_step()
                except Exception as e:  # never let the thread die: fail what is in flight, start clean
                    log.exception("engine step failed")
                    for job in {s.job for s in self._running} | set(self._prefilling):
                        self._fail(job, f"internal error: {e}")
        with self._cond:
            for job in list(self._queue) + self._prefilling + [s.job for s in self._running]:
                if not job.done:
                    self._fail(job, "the server is shutting down")
            self._queue.clear()

    def _drop_cancelled(self) -> None:
        if any(j.cancelled for j in self._queue):
            self._queue = collections.deque(j for j in self._queue if not j.cancelled)
        for job in [j for j in self._prefilling if j.cancelled]:
            self._release(job)
        for job in {s.job for s in self._running if s.job.cancelled}:
            self._release(job)

    def _admit(self) -> None:
        while self._queue and len(self._free) >= self._queue[0].opts.n:
            job = self._queue.popleft()
            job.rows = [self._free.pop(0) for _ in range(job.opts.n)]
            self.cache.reset(job.rows)
            self._prefilling.append(job)

    # ----------------------------------------------------------------- prefill
    def _prefill_group(self) -> list[tuple[Job, int]]:
        """Which prefilling jobs take part in this step's prefill forward, and how many prompt tokens each.

        The forward is right-padded to its longest chunk, so it costs ``len(group) × longest`` tokens;
        that is held to ``prefill_chunk`` (the cap on prefill tokens per step). The oldest job always
        goes: a prompt longer than the cap goes alone, ``prefill_chunk`` tokens at a time, so the
        running sequences decode between its chunks. Younger jobs join when their whole remaining
        prompt fits the cap alongside (a job that does not fit waits, ahead of the younger ones, for
        the next step)."""
        budget, room = self.prefill_chunk, self.cache.max_seq_len
        group: list[Job] = []
        longest = start = 0
        for job in self._prefilling:
            rem = len(job.prompt_ids) - job.prefilled
            if not group:
                group.append(job)
                longest, start = min(rem, budget), job.prefilled
                continue
            t = max(longest, rem)
            if rem > 0 and (len(group) + 1) * t <= budget and max(start, job.prefilled) + t <= room:
                group.append(job)
                longest, start = t, max(start, job.prefilled)
        return [(job, min(len(job.prompt_ids) - job.prefilled, longest)) for job in group]

    def _prefill_some(self) -> None:
        group = self._prefill_group()
        if not group:
            return
        try:
            self._prefill_batch(group)
        except Exception as e:
            if len(group) == 1:
                log.exception("prefill failed")
                self._fail(group[0][0], f"prefill failed: {e}")
                return
            # find the prompt that breaks the batched forward; the others go on
            log.exception("batched prefill failed; retrying row by row")
            for job, n in group:
                try:
                    self._prefill_batch([(job, n)])
                except Exception as e1:
                    log.exception("prefill failed")
                    self._fail(job, f"prefill failed: {e1}")

    def _prefill_batch(self, group: list[tuple[Job, int]]) -> None:
        """Prefill the next ``n`` prompt tokens of each job in one forward (``Runner.prefill_rows``); a job
        whose prompt is then complete starts decoding. Raises (with the cache rows as they were) only if
        the forward does."""
        chunks = [job.prompt_ids[job.prefilled:job.prefilled + n] for job, n in group]
        logits = self.runner.prefill_rows([job.rows[0] for job, _ in group], chunks)
        seqs, picks = [], []
        for i, ((job, _), chunk) in enumerate(zip(group, chunks)):
            job.prefilled += len(chunk)
            if job.prefilled < len(job.prompt_ids):
                continue
            try:
                # prompt done: copy the row to the job's other rows, then every choice samples its first token
                row = job.rows[0]
                for other in job.rows[1:]:
                    self.cache.copy_row(row, other)
                job.seqs = [_Choice(job, job.opts.first_index + k, r, self.tok, self.device)
                            for k, r in enumerate(job.rows)]
                for s in job.seqs:
                    self.counts.reset(s.row, job.prompt_ids)
            except Exception as e:
                log.exception("starting a job failed")
                self._fail(job, f"prefill failed: {e}")
                continue
            with self._cond:
                self._prefilling.remove(job)
                self._running.extend(job.seqs)
            seqs.extend(job.seqs)
            picks.extend([i] * len(job.seqs))
        if seqs:
            self._sample_and_emit(seqs, logits[torch.tensor(picks, device=logits.device)])

    # ----------------------------------------------------------------- decode
    def _decode_step(self) -> None:
        seqs = [s for s in self._running if not s.finished and s.next_input is not None]
        if not seqs:
            return
        self.steps += 1
        self.max_running = max(self.max_running, len(seqs))
        try:
            logits = self._forward(seqs)
        except Exception:
            log.exception("batched decode failed; retrying row by row")
            ok, outs = [], []
            for s in seqs:
                try:
                    outs.append(self._forward([s]))
                    ok.append(s)
                except Exception as e:
                    self._fail(s.job, f"decode failed: {e}")
            if not ok:
                return
            seqs, logits = ok, torch.cat(outs)
        self._sample_and_emit(seqs, logits)

    def _forward(self, seqs: list[_Choice]) -> torch.Tensor:
        return self.runner.decode([s.row for s in seqs], [s.next_input for s in seqs])

    def _sample_and_emit(self, seqs: list[_Choice], logits: torch.Tensor) -> None:
        rows = torch.tensor([s.row for s in seqs], dtype=torch.long, device=logits.device)
        try:
            out = sample(logits, [s.state.params for s in seqs], [s.state.generator for s in seqs], self.counts, rows)
        except Exception:
            # find the row whose parameters break sampling; the others go on
            log.exception("batched sampling failed; retrying row by row")
            for i, s in enumerate(seqs):
                try:
                    self._sample_and_emit([s], logits[i:i + 1])
                except Exception as e:
                    self._fail(s.job, f"sampling failed: {e}")
            return
        self.counts.add(out.tokens, rows)
        tokens = out.tokens.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, s in enumerate(seqs):
            if s.job.done:
                continue
            try:
                lp = None
                if s.state.wants_logprobs():
                    k = s.state.params.top_logprobs
                    top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids is not None else []
                    lp = TokenLogprob(tokens[i], lps[i], top)
                self._advance(s, tokens[i], lp)
            except Exception as e:
                log.exception("emitting a token failed")
                self._fail(s.job, f"generation failed: {e}")

    def _advance(self, s: _Choice, token: int, lp: TokenLogprob | None) -> None:
        job = s.job
        text, finished = s.state.accept(token)
        if not finished:
            s.next_input = token
            if text or lp is not None:
                job.sink(Delta(s.index, text, [token], [lp] if lp else None))
            return
        s.next_input = None
        self._free_row(s)
        job.sink(Delta(s.index, text, [token], [lp] if lp else None, finish_reason=s.state.finish_reason,
                       prompt_tokens=len(job.prompt_ids), completion_tokens=s.state.num_sampled))
        if all(x.finished for x in job.seqs):
            job.done = True

    # ----------------------------------------------------------------- bookkeeping
    def _free_row(self, s: _Choice) -> None:
        with self._cond:
            if s in self._running:
                self._running.remove(s)
            if s.row not in self._free:
                self.cache.reset([s.row])
                self._free.append(s.row)

    def _release(self, job: Job) -> None:
        """Take a job out of the engine and free all its rows."""
        with self._cond:
            if job in self._prefilling:
                self._prefilling.remove(job)
            self._running = [s for s in self._running if s.job is not job]
            for r in job.rows:
                if r not in self._free:
                    self.cache.reset([r])
                    self._free.append(r)
            job.done = True

    def _fail(self, job: Job, message: str) -> None:
        already = job.done
        self._release(job)
        if not already:
            try:
                job.sink(Failed(message))
            except Exception:
                log.exception("could not report a failure")
