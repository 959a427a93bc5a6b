"""A stand-in for TensorRT-LLM's in-flight batching scheduler, on a transformers causal LM (CPU by default).

One background thread owns the model and runs the loop. Each iteration:

1. drops requests that were cancelled (waiting or running);
2. admits waiting requests up to ``max_batch_size`` running ones; each is prefilled alone (batch 1), which
   yields its KV cache and its first token, and then joins the batch;
3. runs ONE decode step for every running request together: a single forward pass over ``input_ids [B, 1]``,
   each row with its own position id, against one batched, left-padded KV cache and a 2-D attention mask that
   hides each row's padding;
4. samples every row with its own settings, grammar and random stream, and retires the rows that finished.

Guided rows cost little on top of that: the grammar mask of a step depends only on the tokens accepted before it,
so a second thread fills the masks of the step while its forward pass runs (xgrammar and torch both release the
GIL), and once the logits are there the masks of all guided rows are applied in one operation and every greedy
row's token taken in one argmax, guided or not.

The batched cache is re-laid out only when membership changes: a joining request is left-padded (or the batch
is) to the common length and concatenated on the batch dimension; a leaving request's row is dropped, along with
leading columns that are padding for every remaining row. Between changes the cache just grows by one column
per step, as a ``DynamicCache`` does. Padding columns are masked out of attention, so a greedy request produces
the same tokens alone as in any batch.

``device`` and ``dtype`` put the model, its KV cache and every tensor the loop creates (ids, positions, masks,
random generators, grammar bitmasks) on another device or in a lower precision; the default is CPU, float32.
Sampling always works on float32 logits, and results are plain Python on the host.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ragstack.governance.engine_spec import EngineSpec
from ragstack.engines.common import place_model, resolve_device, resolve_dtype
from ragstack.engines.generation.guided import GuideCompiler, GuideState, apply_bitmask, refresh_all
from ragstack.engines.generation.request import (KV_BLOCK_TOKENS, NO_END_ID, GenerationRequest, GenerationResult,
                                         validate_request)
from ragstack.engines.generation.sampling import (apply_penalties, has_penalties, make_generator, sample_token,
                                          suppress_end, token_counts)
from ragstack.triton.polling import CANCEL_POLL_S, Throttled

log = logging.getLogger(__name__)

OnUpdate = Callable[[list[int], bool, Optional[GenerationResult]], None]


class GenerationHandle:
    """The caller's view of a submitted request: cancel it, or wait for its result."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.result: Optional[GenerationResult] = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next step (finish reason "cancelled")."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> Optional[GenerationResult]:
        """The result once the request finished, or None if ``timeout`` seconds passed first."""
        return self.result if self._done.wait(timeout) else None

    def _finish(self, result: GenerationResult) -> None:
        self.result = result
        self._done.set()


class _Sequence:
    """Engine-thread state of one request, from submission to its final update."""

    def __init__(self, handle: GenerationHandle, request: GenerationRequest, compiled_grammar, end_id: int,
                 on_update: OnUpdate, is_cancelled: Callable[[], bool]):
        self.handle = handle
        self.request = request
        self.compiled_grammar = compiled_grammar
        self.end_id = end_id
        self.on_update = on_update
        self.is_cancelled = is_cancelled
        self.guide: Optional[GuideState] = None
        self.generator: Optional[torch.Generator] = None
        self.generated: list[int] = []
        self.counts: Optional[torch.Tensor] = None   # occurrences per token id (prompt + output), for penalties
        self.unreported: list[int] = []      # streamed tokens not yet passed to on_update
        self.next_input: int = -1            # token fed to the next decode step
        self.position: int = 0               # tokens in this request's KV cache = its next position id
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.arrival_ns = time.time_ns()
        self.scheduled_ns = 0
        self.first_token_ns = 0
        self.last_token_ns = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        """Set the finish reason; the first one stands."""
        if not self.finished:
            self.finish_reason, self.error = reason, error

    def fail(self, error: str) -> None:
        """Finish with "error", overriding a reason the client was never told about."""
        self.finish_reason, self.error = "error", error

    def result(self) -> GenerationResult:
        request = self.request
        output = list(self.generated) if request.exclude_input_in_output else \
            [int(t) for t in request.input_ids] + self.generated
        blocks = math.ceil((len(request.input_ids) + len(self.generated)) / KV_BLOCK_TOKENS)
        return GenerationResult(
            output_ids=output, finish_reason=self.finish_reason, num_input_tokens=len(request.input_ids),
            num_output_tokens=len(self.generated), arrival_time_ns=self.arrival_ns,
            first_scheduled_time_ns=self.scheduled_ns, first_token_time_ns=self.first_token_ns,
            last_token_time_ns=self.last_token_ns, kv_cache_alloc_total_blocks=blocks,
            kv_cache_alloc_new_blocks=blocks, kv_cache_reused_blocks=0, error=self.error)


def _penalised(request: GenerationRequest) -> bool:
    return has_penalties(float(request.repetition_penalty), float(request.presence_penalty),
                         float(request.frequency_penalty), int(request.min_tokens), float(request.len_penalty))


def _plain_greedy(sequence: _Sequence) -> bool:
    """Greedy (as :func:`sample_token` decides) and unpenalised: the next token is the argmax of the logits,
    once a guided row's grammar mask is applied."""
    request = sequence.request
    return sequence.counts is None and (float(request.temperature) == 0 or int(request.top_k) == 1)


def _argmax_rows(logits: torch.Tensor) -> list:
    """Each row's argmax (the first one on a tie, as ``torch.argmax``). On CPU numpy takes it on one thread: a
    few hundred KB do not need torch's thread pool, whose barrier costs milliseconds when the cores are busy."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(axis=1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``tensor`` on the left of ``dim`` (a negative index) up to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


class InflightBatchingEngine:
    """Serves :class:`GenerationRequest` objects from one background thread with in-flight batching.

    ``num_threads`` sets torch's intra-op thread count, which is per process: in Triton every model instance is
    its own process, so this is the instance's share of the cores. ``device`` ("cpu", "cuda", "cuda:1", ...) and
    ``dtype`` (a torch dtype or "float32" / "bfloat16" / "float16") place the model; ``model`` injects an
    already built causal LM (for one built in memory) instead of loading the folder's weights, which still
    supplies ``engine.json`` and the tokenizer. A running request's ``is_cancelled`` is asked at most every
    ``cancel_poll_s`` seconds (0: at every step).
    """

    def __init__(self, model_dir, max_batch_size: int = 8, num_threads: Optional[int] = None, *,
                 device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = "float32",
                 model: Optional[torch.nn.Module] = None, cancel_poll_s: float = CANCEL_POLL_S):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        model_dir = Path(model_dir)
        self.spec = EngineSpec.read(model_dir)
        if self.spec.kind != "generate":
            raise ValueError(f"{model_dir} holds a {self.spec.kind!r} engine, not a generate engine")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        self.model = place_model(model, self.device, self.dtype)
        if any(DynamicCache(config=self.model.config).is_sliding):
            # Sliding-window layers keep a rolling window that left-padding would shift; not supported here.
            raise ValueError(f"{model_dir}: sliding-window attention layers are not supported by this engine")
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_batch_size = max_batch_size
        self.cancel_poll_s = float(cancel_poll_s)
        self.max_seq_len = int(self.spec.max_seq_len)
        self.max_input_len = int(self.spec.max_input_len or self.spec.max_seq_len)
        self.guides = GuideCompiler(self.tokenizer, self.vocab_size)

        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._stopping = False
        # Engine-thread state: the running requests, in the row order of the batched cache and its mask.
        self._active: list[_Sequence] = []
        self._cache: Optional[DynamicCache] = None
        self._cache_mask: Optional[torch.Tensor] = None   # [B, cache length]: 1 = real token, 0 = padding
        self._counters = {"steps": 0, "prefills": 0, "tokens_generated": 0, "max_batch_seen": 0,
                          "requests_finished": 0, "admitted_ahead_of_older": 0}
        self._admitted_by_priority: dict[int, int] = {}
        # Fills the grammar masks of a decode step while its forward pass runs (started on first use).
        self._grammar_thread: Optional[ThreadPoolExecutor] = None
        self._thread = threading.Thread(target=self._run, name="ragstack-generation", daemon=True)
        self._thread.start()

    # ---- caller-facing API -----------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_update: OnUpdate,
               is_cancelled: Callable[[], bool] = lambda: False) -> GenerationHandle:
        """Validate and queue a request; raises InvalidInput at once for a bad one.

        ``on_update(new_token_ids, done, result)`` runs on the engine thread: when streaming, once per generated
        token (the last call has ``done=True`` and the result, possibly with no new token); otherwise once, at
        the end, with all generated ids. ``new_token_ids`` never include the input ids or a final end id.
        ``is_cancelled`` is polled between steps, at most every ``cancel_poll_s`` seconds.
        """
        compiled = validate_request(request, vocab_size=self.vocab_size, max_input_len=self.max_input_len,
                                    max_seq_len=self.max_seq_len, guides=self.guides)
        end_id = self.spec.end_id if request.end_id is None else int(request.end_id)
        handle = GenerationHandle(next(self._ids))
        sequence = _Sequence(handle, request, compiled, end_id, on_update, Throttled(is_cancelled, self.cancel_poll_s))
        with self._lock:
            if self._stopping:
                raise RuntimeError("the generation engine is shut down")
            self._pending.append(sequence)
            self._lock.notify()
        return handle

    def generate(self, request: GenerationRequest, timeout: Optional[float] = None) -> GenerationResult:
        """Submit and wait; on timeout the request is cancelled and TimeoutError raised."""
        handle = self.submit(request, on_update=lambda new_ids, done, result: None)
        result = handle.wait(timeout)
        if result is None:
            handle.cancel()
            raise TimeoutError(f"generation did not finish within {timeout} s")
        return result

    def stats(self) -> dict:
        """Counters; ``admitted_by_priority`` {level: requests}; ``admitted_ahead_of_older``: admissions of a
        request while an older, less urgent one kept waiting."""
        with self._lock:
            return dict(self._counters, active=len(self._active), queued=len(self._pending),
                        admitted_by_priority=dict(self._admitted_by_priority))

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop the loop after its current step; running and waiting requests finish as "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._pending or self._active):
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as exc:  # a bug in the loop itself: fail the running requests, keep serving
                    log.exception("generation loop iteration failed")
                    self._abandon_batch("error", f"engine error: {exc}")
            with self._lock:
                waiting = list(self._pending)
                self._pending.clear()
            self._abandon_batch("cancelled")
            for sequence in waiting:
                sequence.finish("cancelled")
                self._complete(sequence)
            if self._grammar_thread is not None:
                self._grammar_thread.shutdown(wait=True)

    def _iteration(self) -> None:
        with self._lock:
            waiting = list(self._pending)
        dropped = [s for s in waiting if self._poll_cancelled(s)]
        if dropped:
            with self._lock:
                for sequence in dropped:
                    self._pending.remove(sequence)
            for sequence in dropped:
                self._complete(sequence)
        for sequence in self._active:
            self._poll_cancelled(sequence)
        self._retire_finished()

        with self._lock:
            admitted = self._admit(self.max_batch_size - len(self._active))
        for sequence in admitted:
            self._prefill(sequence)
            self._stream(sequence)
            if sequence.finished and sequence not in self._active:
                self._complete(sequence)
        self._retire_finished()  # joined, then its first streamed update failed

        if self._active:
            self._decode_step()
            for sequence in self._active:
                self._stream(sequence)
            self._retire_finished()

    def _admit(self, room: int) -> list:
        """Take up to ``room`` waiting requests, most urgent level first, in arrival order within a level (the
        lock is held). A request that is not admitted stays where it was in the queue."""
        if room <= 0 or not self._pending:
            return []
        chosen = sorted(self._pending, key=lambda s: s.request.priority)[:room]   # stable: FIFO per level
        taken = set(map(id, chosen))
        left = [s for s in self._pending if id(s) not in taken]
        for sequence in chosen:
            level = sequence.request.priority
            self._admitted_by_priority[level] = self._admitted_by_priority.get(level, 0) + 1
            if any(w.request.priority > level and w.arrival_ns <= sequence.arrival_ns for w in left):
                self._counters["admitted_ahead_of_older"] += 1
        self._pending = deque(left)
        return chosen

    def _abandon_batch(self, reason: str, error: Optional[str] = None) -> None:
        """Finish every running request with ``reason`` and drop the batched cache."""
        for sequence in self._active:
            sequence.finish(reason, error)
            self._complete(sequence)
        with self._lock:
            self._active = []
        self._cache = self._cache_mask = None

    def _poll_cancelled(self, sequence: _Sequence) -> bool:
        """Cancellation through the handle is seen at once; the caller's ``is_cancelled`` is throttled (see
        :meth:`submit`)."""
        try:
            if sequence.handle.cancel_requested or sequence.is_cancelled():
                sequence.finish("cancelled")
        except Exception as exc:
            sequence.finish("error", f"is_cancelled failed: {exc!r}")
        return sequence.finished

    def _prefill(self, sequence: _Sequence) -> None:
        """Run the prompt alone, sample the first token, and unless that finished it, join the batch."""
        sequence.scheduled_ns = time.time_ns()
        request = sequence.request
        try:
            sequence.generator = make_generator(request.seed, self.device)
            if _penalised(request):
                sequence.counts = token_counts(request.input_ids, self.vocab_size, self.device)
            if sequence.compiled_grammar is not None:
                stop_ids = [] if sequence.end_id == NO_END_ID else [sequence.end_id]
                sequence.guide = self.guides.new_state(sequence.compiled_grammar, stop_ids)
            cache = DynamicCache(config=self.model.config)
            input_ids = torch.tensor([[int(t) for t in request.input_ids]], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1, :]
            sequence.position = input_ids.shape[1]
            self._counters["prefills"] += 1
            self._take_token(sequence, self._sample(sequence, logits))
            if not sequence.finished:
                self._join_batch(sequence, cache)
        except Exception as exc:
            log.exception("prefill of request %d failed", sequence.handle.request_id)
            sequence.finish("error", f"prefill failed: {exc}")

    def _decode_step(self) -> None:
        """One forward pass for all running requests; rows that fail to sample fail alone.

        The guided rows' masks for this step are filled on the grammar thread during the forward pass, then
        applied to the logits of all of them in one operation; every greedy, unpenalised row takes its token
        from one argmax over the batch.
        """
        batch = self._active
        input_ids = torch.tensor([[s.next_input] for s in batch], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[s.position] for s in batch], dtype=torch.long, device=self.device)
        attention_mask = torch.cat([self._cache_mask, self._cache_mask.new_ones(len(batch), 1)], dim=1)
        masks = self._start_masks(batch)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=self._cache, use_cache=True).logits[:, -1, :]
        except Exception as exc:
            log.exception("decode step failed for a batch of %d", len(batch))
            for sequence in batch:
                sequence.finish("error", f"decode step failed: {exc}")
            return
        finally:
            if masks is not None:
                masks.result()   # the guides are the engine thread's again (refresh_all keeps failures per row)
        self._cache_mask = attention_mask
        self._counters["steps"] += 1
        self._counters["max_batch_seen"] = max(self._counters["max_batch_seen"], len(batch))
        logits = logits.float()  # a no-op for a float32 model
        self._mask_guided_rows(batch, logits)
        # Greedy rows need only the argmax: take every row's in one reduction and one copy to the host (the same
        # ids as row by row; it saves a device round trip per row on a GPU).
        greedy = [not s.finished and _plain_greedy(s) for s in batch]
        argmax = _argmax_rows(logits) if any(greedy) else None
        for row, sequence in enumerate(batch):
            sequence.position += 1
            if sequence.finished:   # its mask failed, or its grammar allows nothing more
                continue
            try:
                if greedy[row]:
                    token = argmax[row]
                elif sequence.counts is None:   # a guided row's mask is applied already
                    request = sequence.request
                    token = sample_token(logits[row], float(request.temperature), int(request.top_k),
                                         float(request.top_p), sequence.generator)
                else:
                    token = self._sample(sequence, logits[row:row + 1])
                self._take_token(sequence, token)
            except Exception as exc:
                log.exception("sampling failed for request %d", sequence.handle.request_id)
                sequence.finish("error", f"sampling failed: {exc}")

    def _start_masks(self, batch: list):
        """Refresh the pending grammar masks of ``batch`` on the grammar thread; the returned future (None when
        there is nothing to do) must be waited for before any of those guides is used again."""
        pending = [s.guide for s in batch if s.guide is not None and s.guide.pending]
        if not pending:
            return None
        if self._grammar_thread is None:
            self._grammar_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragstack-grammar")
        return self._grammar_thread.submit(refresh_all, pending)

    def _mask_guided_rows(self, batch: list, logits: torch.Tensor) -> None:
        """Apply the grammar masks of the guided, unpenalised rows to ``logits`` [B, vocab] in one operation.

        A row whose mask failed fails alone; one whose grammar allows nothing but an end token (or nothing at
        all) finishes as "grammar_terminated", as it would have right after its last token had its mask been
        computed then. Penalised rows are masked in :meth:`_sample`, after their penalties.
        """
        rows, masks = [], []
        for row, sequence in enumerate(batch):
            guide = sequence.guide
            if guide is None or sequence.finished:
                continue
            try:
                mask = guide.bitmask()
            except Exception as exc:
                log.exception("grammar mask of request %d failed", sequence.handle.request_id)
                sequence.finish("error", f"sampling failed: {exc}")
                continue
            if guide.must_stop:
                sequence.finish("grammar_terminated")
            elif sequence.counts is None:
                rows.append(row)
                masks.append(mask)
        if not rows:
            return
        # Gathered with numpy: torch would start its thread pool for these few KB, which costs milliseconds when
        # the cores are busy (rows without a mask keep every bit set; they are not in ``rows`` anyway).
        bitmask = np.full((len(batch), masks[0].shape[1]), -1, dtype=np.int32)
        for row, mask in zip(rows, masks):
            bitmask[row] = mask.numpy()[0]
        try:
            apply_bitmask(logits, torch.from_numpy(bitmask), self.vocab_size, rows)
        except Exception as exc:
            log.exception("applying the grammar masks failed for %d rows", len(rows))
            for row in rows:
                batch[row].finish("error", f"sampling failed: {exc}")

    @staticmethod
    def _sample(sequence: _Sequence, logits: torch.Tensor) -> int:
        """``logits``: this request's row, shape [1, vocab]; the grammar mask is applied first, so that even
        greedy decoding stays inside the grammar."""
        logits = logits.float()  # a no-op for a float32 model
        request = sequence.request
        if sequence.counts is not None:
            logits = apply_penalties(logits, sequence.counts, repetition_penalty=float(request.repetition_penalty),
                                     presence_penalty=float(request.presence_penalty),
                                     frequency_penalty=float(request.frequency_penalty))
            if int(request.min_tokens) > len(sequence.generated) and sequence.end_id != NO_END_ID:
                unguided = logits.clone() if sequence.guide is not None else None
                suppress_end(logits, [sequence.end_id], len(sequence.generated), int(request.min_tokens))
                if unguided is not None:
                    sequence.guide.apply(logits)
                    if not torch.isfinite(logits).any():   # the grammar allows only the end: it wins
                        logits = unguided
                        sequence.guide.apply(logits)
                    return sample_token(logits[0], float(request.temperature), int(request.top_k),
                                        float(request.top_p), sequence.generator)
        if sequence.guide is not None:
            sequence.guide.apply(logits)
        return sample_token(logits[0], float(request.temperature), int(request.top_k), float(request.top_p),
                            sequence.generator)

    def _take_token(self, sequence: _Sequence, token: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        now = time.time_ns()
        sequence.first_token_ns = sequence.first_token_ns or now
        sequence.last_token_ns = now
        if token == sequence.end_id:
            sequence.finish("end_id")
            return
        guide = sequence.guide
        if guide is not None:
            guide.accept(token)
            if guide.terminated:  # one of the tokenizer's end tokens, when the request has no end id
                sequence.finish("grammar_terminated")
                return
        sequence.generated.append(token)
        if sequence.counts is not None:
            sequence.counts[token] += 1
        sequence.unreported.append(token)
        sequence.next_input = token
        self._counters["tokens_generated"] += 1
        request = sequence.request
        if any(sequence.generated[-len(word):] == list(word) for word in request.stop_words
               if len(word) <= len(sequence.generated)):
            sequence.finish("stop_word")
        elif len(sequence.generated) >= request.max_new_tokens:
            sequence.finish("length")
        elif guide is not None and guide.must_stop:
            # Only an end token could follow: finish now rather than spend a forward pass to sample it.
            sequence.finish("grammar_terminated")

    def _stream(self, sequence: _Sequence) -> None:
        """Pass a streaming request's new tokens to ``on_update``; the final ones go with the result instead."""
        if sequence.finished or not sequence.request.streaming or not sequence.unreported:
            return
        new_ids, sequence.unreported = sequence.unreported, []
        try:
            sequence.on_update(new_ids, False, None)
        except Exception as exc:
            log.exception("on_update of request %d failed", sequence.handle.request_id)
            sequence.fail(f"on_update failed: {exc!r}")

    def _complete(self, sequence: _Sequence) -> None:
        """The final ``on_update`` (done=True, with the result) and the handle's completion, once per request.

        If the final call itself raises, the client may not have the result, so it is told once more that the
        request failed.
        """
        if sequence.handle.done:
            return
        new_ids = sequence.unreported if sequence.request.streaming else list(sequence.generated)
        sequence.unreported = []
        try:
            sequence.on_update(new_ids, True, sequence.result())
        except Exception as exc:
            log.exception("final on_update of request %d failed", sequence.handle.request_id)
            if sequence.finish_reason != "error":
                sequence.fail(f"on_update failed: {exc!r}")
                try:
                    sequence.on_update([], True, sequence.result())
                except Exception:
                    log.exception("error report to request %d failed too", sequence.handle.request_id)
        with self._lock:
            self._counters["requests_finished"] += 1
        sequence.handle._finish(sequence.result())

    def _retire_finished(self) -> None:
        """Complete the finished running requests and remove their rows from the batched cache, then drop the
        leading columns that have become padding in every remaining row."""
        keep = [row for row, s in enumerate(self._active) if not s.finished]
        if len(keep) == len(self._active):
            return
        for sequence in self._active:
            if sequence.finished:
                self._complete(sequence)
        with self._lock:
            self._active = [self._active[row] for row in keep]
        if not keep:
            self._cache = self._cache_mask = None
            return
        self._cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.device))
        mask = self._cache_mask[keep]
        unused = int((mask.sum(dim=0) > 0).long().argmax())  # first column some row still uses
        if unused:
            # DynamicLayer.crop only trims the right end; padding sits on the left.
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., unused:, :]
                layer.values = layer.values[..., unused:, :]
            mask = mask[:, unused:]
        self._cache_mask = mask

    def _join_batch(self, sequence: _Sequence, cache: DynamicCache) -> None:
        """Add a prefilled request's cache as a new row: left-pad the shorter side to the common length."""
        length = cache.get_seq_length()
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._cache_mask = cache, row_mask
        else:
            common = max(length, self._cache_mask.shape[1])
            layers = [(torch.cat([_left_pad(old.keys, common, -2), _left_pad(new.keys, common, -2)]),
                       torch.cat([_left_pad(old.values, common, -2), _left_pad(new.values, common, -2)]))
                      for old, new in zip(self._cache.layers, cache.layers)]
            self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            self._cache_mask = torch.cat([_left_pad(self._cache_mask, common, -1),
                                          _left_pad(row_mask, common, -1)])
        with self._lock:
            self._active.append(sequence)
