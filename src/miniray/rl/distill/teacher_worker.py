"""One teacher worker process: a model copy that scores token sequences for the broker.

    broker (teacher_server) ROUTER  ipc://<private dir>/workers
        ^  | [client id, request frames...]
        |  v
    worker DEALER  --READY-->  (once the model is loaded)
                   <--request-- --reply-->   one request at a time

The broker hands a worker a request only when the worker is idle, so a worker never queues.
A request that fails validation or makes the model raise gets an ``error`` reply; the worker
keeps serving. A worker whose broker died (re-parented) exits on its own within a fraction of a
second, so a ``kill -9`` of the broker leaves no orphans behind.

A worker ends with ``os._exit`` once it has closed its socket and flushed its logs: it owns no
state worth tearing down, and the interpreter's own teardown of torch and transformers (module
dictionaries, objects, library destructors) costs about a second of CPU on an idle machine and
several on a loaded one, during which the "exited" worker still holds its model's memory.

``TeacherModel.score`` is the computation itself, also used in-process by tests and by
``benchmarks/teacher_throughput.py`` as the floor the server is measured against.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from miniray.rl.distill import wire

log = logging.getLogger("miniray.rl.distill.teacher_worker")

DEFAULT_MAX_BATCH_TOKENS = 16384
# How often an idle worker checks that its broker is alive: a killed broker's workers are gone
# within about this long (plus the exit itself); the check is one getppid() call.
WATCH_MS = 200


class TeacherModel:
    """A causal LM in inference mode that returns next-token log-probs and top-k."""

    def __init__(self, model: Any, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= 1")
        self.model = model.eval()
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_seq_len = getattr(config, "max_position_embeddings", None)
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, model_path: str, *, dtype: str = "float32", device: str = "cpu", **kwargs: Any
    ) -> TeacherModel:
        from transformers import AutoModelForCausalLM

        from miniray.rl.models.tiny import dtype_argument

        model = AutoModelForCausalLM.from_pretrained(
            model_path, **dtype_argument(getattr(torch, dtype))
        )
        # transformers types PreTrainedModel.to as functools.wraps(nn.Module.to), whose stub
        # wants the module again as the first argument
        return cls(model.to(device), **kwargs)  # type: ignore[arg-type]

    @torch.inference_mode()
    def score(
        self,
        input_ids: torch.Tensor,
        lengths: Sequence[int],
        *,
        topk: int = 0,
        temperature: float = 1.0,
        token_logprobs: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Flat ``(token_logprobs [R], topk_logprobs [R, k], topk_indices [R, k])``.

        ``input_ids`` holds the sequences back to back (``lengths``); ``R = sum(len - 1)``,
        rows in sequence order. Log-probs are ``log_softmax(logits / temperature)``.
        """
        lengths = [int(n) for n in lengths]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        row_starts = [s - i for i, s in enumerate(starts)]  # sum of (len - 1) before each seq
        total_rows = row_starts[-1]
        out_tok = torch.empty(total_rows) if token_logprobs else None
        out_lp = torch.empty(total_rows, topk) if topk else None
        out_idx = torch.empty(total_rows, topk, dtype=torch.long) if topk else None
        # Longest first, in groups whose padded size fits max_batch_tokens: little padding, and
        # the [batch, len, vocab] log-prob tensor stays bounded.
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for group in self._groups(order, lengths):
            width = lengths[group[0]]
            if width < 2:
                continue  # a 1-token sequence has nothing to predict
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lengths[i]] = input_ids[starts[i] : starts[i + 1]]
                mask[row, : lengths[i]] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1, : self.vocab_size].float() / temperature, -1)
            if token_logprobs:
                chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
            if topk:
                top_lp, top_idx = logp.topk(topk, dim=-1)
                top_lp, top_idx = top_lp.cpu(), top_idx.cpu()
            for row, i in enumerate(group):
                n, at = lengths[i] - 1, row_starts[i]
                if out_tok is not None:  # token_logprobs
                    out_tok[at : at + n] = chosen[row, :n]
                if out_lp is not None and out_idx is not None:  # topk
                    out_lp[at : at + n] = top_lp[row, :n]
                    out_idx[at : at + n] = top_idx[row, :n]
        return out_tok, out_lp, out_idx

    def _groups(self, order: list[int], lengths: list[int]):
        group: list[int] = []
        for i in order:
            width = lengths[group[0]] if group else lengths[i]
            if group and width * (len(group) + 1) > self.max_batch_tokens:
                yield group
                group = []
            group.append(i)
        if group:
            yield group


def handle_request(
    teacher: TeacherModel,
    frames: Sequence[Any],
    *,
    max_request_bytes: int,
    max_topk: int | None,
    worker: int | None = None,
) -> list[Any]:
    """The reply frames for one request's frames; never raises for anything a request holds.

    A worker that raised would exit, and the broker takes a dead worker for an OOM kill and
    shuts the whole server down: one malformed request would end the service for everyone.
    So a request that breaks the protocol gets its ``WireError`` as the reply, and anything
    else a request makes the validation or the model raise (a gap in the checks, a model that
    chokes on an input) is answered ``internal`` and logged with its traceback.
    """
    header = None
    try:
        header = wire.decode_header(frames[0]) if frames else None  # for the id, first
        header, tensors = wire.decode_message(frames, max_bytes=max_request_bytes)
        request = wire.parse_score_request(
            header,
            tensors,
            vocab_size=teacher.vocab_size,
            max_seq_len=teacher.max_seq_len,
            max_topk=max_topk,
        )
    except wire.WireError as exc:
        return wire.encode_error(wire.request_id_of(header), exc.code, str(exc))
    except Exception as exc:  # validation let something through that then raised
        rid = wire.request_id_of(header)
        log.error("reading request %s failed:\n%s", rid, traceback.format_exc())
        return wire.encode_error(
            rid,
            wire.INTERNAL,
            f"the server could not read the request ({type(exc).__name__}: {exc})",
        )
    try:
        tok, top_lp, top_idx = teacher.score(
            request.input_ids,
            request.lengths,
            topk=request.topk,
            temperature=request.temperature,
            token_logprobs=request.token_logprobs,
        )
        return wire.encode_scores_reply(
            request.request_id,
            token_logprobs=tok,
            topk_logprobs=top_lp,
            topk_indices=top_idx,
            worker=worker,
        )
    except Exception as exc:  # e.g. out of memory (RuntimeError): answer it, keep serving
        log.error("scoring request %s failed:\n%s", request.request_id, traceback.format_exc())
        return wire.encode_error(request.request_id, wire.INTERNAL, f"{type(exc).__name__}: {exc}")


def serve(args: argparse.Namespace) -> int:
    import msgpack
    import zmq

    # The broker passes its pid: a broker killed while this process was still importing torch or
    # loading the model would otherwise go unnoticed (getppid() would already be the reaper's).
    parent = os.getppid() if args.broker_pid is None else args.broker_pid
    torch.set_num_threads(args.num_threads)
    device = args.device
    if device == "cuda" and torch.cuda.device_count() > 1:  # spread workers over the GPUs
        device = f"cuda:{args.index % torch.cuda.device_count()}"
    teacher = TeacherModel.from_pretrained(
        args.model_path, dtype=args.dtype, device=device, max_batch_tokens=args.max_batch_tokens
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"w{args.index}".encode())
    sock.connect(args.backend)
    info = {
        "pid": os.getpid(),
        "vocab_size": teacher.vocab_size,
        "max_seq_len": teacher.max_seq_len,
    }
    sock.send_multipart([b"", b"READY", msgpack.packb(info)])  # empty first: a control message
    try:
        while True:
            if not sock.poll(WATCH_MS):
                if os.getppid() != parent:  # the broker is gone: nobody will ever ask again
                    log.error("teacher worker %d: broker %d died, exiting", args.index, parent)
                    _remove_ipc_dir(args.backend)
                    return 1
                continue
            client, *frames = sock.recv_multipart(copy=False)
            reply = handle_request(
                teacher,
                [f.buffer for f in frames],
                max_request_bytes=args.max_request_bytes,
                max_topk=args.max_topk,
                worker=args.index,
            )
            sock.send_multipart([client, *reply], copy=False)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the broker decides
        return 0
    finally:
        sock.close()
        ctx.term()


def _remove_ipc_dir(backend: str) -> None:
    """A killed broker leaves its private ipc directory behind; its workers remove it."""
    if backend.startswith("ipc://"):
        directory = os.path.dirname(backend.removeprefix("ipc://"))
        if os.path.basename(directory).startswith("miniray-teacher-"):
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one teacher worker (started by teacher_server)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--backend", required=True, help="the broker's ipc:// address")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--max-request-bytes", type=int, default=wire.DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--max-topk", type=int, default=None)
    parser.add_argument(
        "--broker-pid",
        type=int,
        default=None,
        help="exit when this process is gone (default: the parent)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    return serve(args)


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown (see the module docstring): logs and
    stdio flushed here are all that teardown would have done for a worker."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to save
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
