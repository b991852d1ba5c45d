"""The training loop. It owns no construction (train/build.py does that).

Per optimizer step: fetch this rank's rows, count valid labels over all dp ranks, run
micro-batches with loss = summed token loss / global valid count (so gradient accumulation and
data parallelism reproduce one big batch), sum gradients over dp, stop on a non-finite loss
before anything is applied, clip, step, log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..kernels.capability import peak_memory_bytes
from ..memory import elimination
from ..memory.accounting import SavedBytes
from ..parallel import layout, vocab
from ..parallel.data_parallel import all_reduce_gradients, all_reduce_sum
from ..parallel.health import Heartbeat, RankFailure
from ..parallel.p2p import communicator
from ..parallel.sharding import clip_grad_norm
from ..recipes import schema
from . import checkpoint as ckpt
from .adapter import merged_state_dict
from .build import Run, train_hparams
from .evaluation import TrainingEvals
from .export import full_state_dict, save_folder
from .metrics import Console, Jsonl, Metrics, WandB

log = logging.getLogger("longctx")
IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    pass


def _sinks(run: Run) -> Metrics:
    if not run.mesh.is_main:
        return Metrics([])
    r = run.recipe
    after = run.start_step if r.train.resume != "none" else None  # a resumed run redoes the steps after it
    sampler = getattr(run.data, "sampler", None)  # decomposition: the ETA follows the curriculum's lengths

    def length_of(step: int) -> int:
        return sampler.length_at(step - 1)

    console = Console(r.train.max_steps, length_of=length_of if sampler is not None else None)
    sinks = [console, Jsonl(run.run_dir / "metrics.jsonl", after_step=after)]
    if r.log.wandb:
        wandb_sink = WandB(run.run_dir, r.log.wandb_project, r.run.name, r.to_dict(), run_id=run.run_id or None)
        sinks.append(wandb_sink)
        if wandb_sink.mode == "offline":
            log.info("W&B is offline (no key configured): upload later with `wandb sync %s`",
                     run.run_dir / "wandb" / "latest-run")
    return Metrics(sinks)


def _summary(run: Run, history: list[dict], stopped: int, seconds: float) -> None:
    """The run's last lines: what was done, how it went and where everything is."""
    if not run.mesh.is_main or not history:
        return
    first, last = history[0], history[-1]
    losses = [h["loss"] for h in history if h["loss"] is not None]  # a skipped step (no label) has none
    evals = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    how = f"stopped by signal {stopped}" if stopped else "finished"
    log.info("%s: steps %d-%d of %d in %.0f s, %d tokens in all; loss %s%s", how, first["step"],
             last["step"], run.recipe.train.max_steps, seconds, last["tokens"],
             f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "- (every step skipped: no label)",
             f"; eval loss {evals[-1]:.4f}" if evals else "")
    saved = ckpt.step_folders(run.run_dir / "checkpoints")
    log.info("run folder %s: metrics.jsonl%s%s", run.run_dir, f", checkpoint {saved[-1].name}" if saved else "",
             ", export/" if (run.run_dir / "export").is_dir() else "")


def _shard(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]:
    """This rank's (inputs, labels, position ids, whole padded length) of the step's rows.

    Labels were shifted by the data source, before any splitting. Under sequence parallelism the
    rows are split zigzag over the bucket's sp sub-group, positions stay global. Packed documents
    (a fourth element: their ids and positions within them) go to `_shard_documents`; any other
    batch clears the attention's documents."""
    inputs, labels, sp = batch[:3]
    inputs = torch.as_tensor(inputs, device=run.mesh.device)
    labels = torch.as_tensor(labels, device=run.mesh.device)
    run.documents = run.document_positions = None
    if len(batch) > 3:
        return _shard_documents(run, inputs, labels, sp, batch[3])
    if run.sp_attention is None:
        return inputs, labels, None, None
    seq_len = layout.padded_length(inputs.shape[1], sp)
    # attention runs once per micro-batch: priced for its rows (the same key on every rank of the sub-group)
    run.sp_attention.set_step(sp, seq_len, rows=_micro_rows(run.recipe, inputs.shape[0], seq_len // sp))
    if sp == 1:
        return inputs, labels, None, None
    inputs, positions, labels = layout.split_batch(inputs, labels, run.mesh.sp_rank % sp, sp, run.pad_id)
    return inputs, labels, positions, seq_len


def _shard_documents(run: Run, inputs, labels, sp: int, extra: dict):
    """`_shard` for packed documents: position ids restart at every document (RoPE sees each
    document from 0, as alone), and the whole rows' document ids (padded; a host tensor) are kept
    in `run.documents` for the micro-batches' attention. The length RoPE scaling sees is the row's.

    Under sequence parallelism the zigzag split balances causal work only when one document fills
    the row or all are short. When the busiest rank would do > 10% over the mean in visible
    (query, key) pairs, the documents of each row are reordered (layout.balance_documents: the
    loss does not depend on their order); if that is still > 10%, the rows are laid out by
    layout.balanced_layout (long documents split zigzag within themselves, short ones to the
    least-loaded rank), and attention masks by (document, position) (`run.document_positions`).
    The imbalance of the plain zigzag and of the layout used go to the step's metrics."""
    docs = torch.as_tensor(extra["documents"], dtype=torch.long)
    positions = torch.as_tensor(extra["positions"], dtype=torch.long)
    S = inputs.shape[1]
    run.document_positions, run.balance = None, None
    if run.sp_attention is not None:
        run.sp_attention.set_step(sp, layout.padded_length(S, sp),
                                  rows=_micro_rows(run.recipe, inputs.shape[0], layout.padded_length(S, sp) // sp))
    if sp == 1:
        run.documents = docs
        return inputs, labels, positions.to(inputs.device), S
    docs = layout.pad(docs, sp, pad_value=layout.PAD_DOCUMENT)
    inputs, labels = layout.pad(inputs, sp, pad_value=run.pad_id), layout.pad(labels, sp, pad_value=IGNORE_INDEX)
    positions = layout.pad(positions, sp)
    pads = docs == layout.PAD_DOCUMENT  # padding ends each row: one document, positions counting up
    positions[pads] = (pads.cumsum(1) - 1)[pads]
    perm, before, after, kind = _balance(run, docs, sp, _micro_rows(run.recipe, docs.shape[0], docs.shape[1] // sp))
    if perm is not None:
        docs, positions = docs.gather(1, perm), positions.gather(1, perm)
        on_device = perm.to(inputs.device)
        inputs, labels = inputs.gather(1, on_device), labels.gather(1, on_device)
    run.documents, run.balance = docs, (before, after, kind)
    if kind == "balanced":
        run.document_positions = positions
    rank = run.mesh.sp_rank % sp
    positions = positions.to(inputs.device)
    return layout.split(inputs, rank, sp), layout.split(labels, rank, sp), layout.split(positions, rank, sp), S


def _balance(run: Run, docs: torch.Tensor, sp: int, rows_per_call: int):
    """(permutation or None, imbalance of the plain zigzag, of the layout chosen, its name) for
    padded rows of document ids, balanced per micro-batch (each is its own attention call) and
    counted where the schedule computes a pair (layout._row_rank_work): the keys' rank under
    token_ring (and hybrid over token_ring), the queries' otherwise. Ulysses splits heads, not
    the sequence: nothing to balance. The worst micro-batch's figures are reported."""
    plan = run.sp_attention.plan
    schedule = plan.outer if plan is not None and plan.name == "hybrid" else run.sp_attention.name
    if schedule == "ulysses":
        return None, 0.0, 0.0, "heads"
    side = "key" if schedule == "token_ring" else "query"
    perms, worst_before, worst_after, kinds = [], 0.0, 0.0, set()
    for start in range(0, docs.shape[0], rows_per_call):
        part = docs[start:start + rows_per_call]
        perm, before, after = layout.balance_documents(part, sp, seed=run.recipe.run.seed, side=side)
        kind = "zigzag" if perm is None else "zigzag_reordered"
        if after > layout.BALANCE_THRESHOLD:
            whole, work = layout.balanced_layout(part, sp, side=side)
            if layout.imbalance(work) < after:
                perm, after, kind = whole, layout.imbalance(work), "balanced"
        perms.append(perm if perm is not None else torch.arange(part.shape[1]).expand(part.shape[0], -1))
        worst_before, worst_after = max(worst_before, before), max(worst_after, after)
        kinds.add(kind)
    if kinds == {"zigzag"}:
        return None, worst_before, worst_after, "zigzag"
    if "balanced" in kinds and len(kinds) > 1:  # one layout per step: the attention masks by position
        return _balance_all_positions(docs, sp, side, worst_before, rows_per_call)
    return torch.cat(perms), worst_before, worst_after, kinds.pop() if len(kinds) == 1 else "zigzag_reordered"


def _balance_all_positions(docs: torch.Tensor, sp: int, side: str, before: float, rows_per_call: int):
    """Every micro-batch in the balanced layout (a step's micro-batches share one way to mask)."""
    perms, worst = [], 0.0
    for start in range(0, docs.shape[0], rows_per_call):
        perm, work = layout.balanced_layout(docs[start:start + rows_per_call], sp, side=side)
        perms.append(perm)
        worst = max(worst, layout.imbalance(work))
    return torch.cat(perms), before, worst, "balanced"


def _micro_rows(r, rows: int, local_len: int) -> int:
    """Rows per micro-batch of a step of `rows` rows of `local_len` tokens on this rank."""
    if not schema.bucketed(r):
        return -(-rows // r.train.grad_accum)
    return min(rows, rows if r.train.micro_batch_tokens is None else max(1, r.train.micro_batch_tokens // local_len))


def _micro_batches(r, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                   documents: torch.Tensor | None = None, document_positions: torch.Tensor | None = None):
    """(inputs, labels, positions, documents) per micro-batch; documents are the rows' ids, or
    (ids, positions within the documents) in a balanced layout, or None."""
    rows = _micro_rows(r, len(inputs), inputs.shape[1])
    n = len(inputs.split(rows))
    pos = positions.split(rows) if positions is not None else [None] * n
    docs = documents.split(rows) if documents is not None else [None] * n
    if document_positions is not None:
        docs = list(zip(docs, document_positions.split(rows)))
    return zip(inputs.split(rows), labels.split(rows), pos, docs)


def _set_documents(run: Run, documents) -> None:
    """The micro-batch's whole-row document ids (or None) to the model's attention callable."""
    if run.attention is not None:
        run.attention.documents = documents


def _autocast(run: Run):
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.mesh.device.type, dtype=run.autocast_dtype)


def _saved_bytes_meter(run: Run, first: bool):
    """Token elimination or MLP channels (memory.elimination), without sharding: the step's first
    micro-batch forward measures the bytes autograd keeps for backward (memory/accounting.SavedBytes;
    MEMO's blocks report theirs by tier), for memory_metrics. Otherwise nothing."""
    model = run.model
    if not first or run.recipe.parallel.sharding != "none" or not (
            getattr(model, "elimination", None) or getattr(model, "mlp_channels", None)):
        return contextlib.nullcontext()
    model.saved_bytes_meter = SavedBytes(model, list(model.model.layers))
    return model.saved_bytes_meter


def memory_metrics(model) -> dict:
    """MEMO's alpha for the last step's bucket, its kept bytes per layer and the host pool; the
    kept-token ratio of each eliminating layer (memory.elimination) over the step, and what the
    first micro-batch saved for backward on this rank (`saved_activation_bytes`, and `_host` under
    MEMO's host tier; blocks and the rest, parameters and frozen weights' casts excluded)."""
    planner = getattr(model, "memory", None)
    out = elimination.take_counts(getattr(model, "elimination", []))
    meter = getattr(model, "saved_bytes_meter", None)
    if meter is not None:
        model.saved_bytes_meter = None
        for tier, key in (("device", "saved_activation_bytes"), ("host", "saved_activation_bytes_host")):
            total = sum(b for (_, t), b in meter.bytes.items() if t == tier)
            if total or tier == "device":
                out[key] = total
    if planner is None or planner.last is None:
        return out
    out |= {"memory_alpha": planner.last.alpha, "memory_alpha_binding": planner.last.binding,
           "memory_swap_bytes_per_layer": planner.last.swap_bytes_per_layer}
    if planner.pool is not None:
        out["memory_host_bytes"] = planner.pool.last_step_bytes
        out["memory_host_pool_bytes"] = planner.pool.capacity_bytes
    return out


def train_step(run: Run, step: int) -> dict:
    r, mesh, model = run.recipe, run.mesh, run.model
    batch = run.data.step_batch(step)
    length = len(batch[0][0])  # the bucket's row length, before any padding for the sp layout
    inputs, labels, positions, seq_len = _shard(run, batch)
    valid = all_reduce_sum(torch.tensor([(labels != IGNORE_INDEX).sum().item()], dtype=torch.float64), mesh.grad_group)
    global_valid = valid.item()
    if global_valid == 0:
        return _skip_step(run, step, length, inputs)
    loss_sum = torch.zeros((), dtype=torch.float64)
    parts = list(_micro_batches(r, inputs, labels, positions, run.documents, run.document_positions))
    try:
        for i, (x, y, pos, docs) in enumerate(parts):
            _set_documents(run, docs)
            with _saved_bytes_meter(run, i == 0), _autocast(run):
                loss = (run.engine or model)(x, position_ids=pos, labels=y, seq_len=seq_len)
            if run.engine is None:
                (loss / global_valid).backward()
            else:  # DeepSpeed averages over ranks: scale to a sum; reduce at the last micro-batch
                run.engine.set_gradient_accumulation_boundary(i == len(parts) - 1)
                run.engine.backward(loss * (mesh.world / global_valid), scale_wrt_gas=False)
            loss_sum += loss.detach().double().cpu()
    finally:  # the step's ids mask nothing after it (evaluation tasks run the model between steps)
        _set_documents(run, None)
    all_reduce_sum(loss_sum, mesh.grad_group)
    mean_loss = (loss_sum / global_valid).item()
    if not math.isfinite(mean_loss):
        (run.engine or run.optimizer).zero_grad()
        raise NonFiniteLossError(
            f"step {step + 1}: loss is {mean_loss} (non-finite); the step was not applied. "
            f"Lower train.lr or check the data; resume from the last checkpoint in {run.run_dir / 'checkpoints'}"
        )
    if run.engine is not None:
        return _with_sources(run, step, _deepspeed_step(run, step, mean_loss, global_valid, length, inputs))
    vp = getattr(model, "vocab_parallel", None)
    sharded = vocab.sharded_parameters(model)
    if r.parallel.sharding == "none":  # FSDP2 reduce-scattered them in backward
        ids = {id(p) for p in sharded}
        all_reduce_gradients([p for p in model.parameters() if id(p) not in ids], mesh.grad_group)
        if sharded and mesh.dp_world > 1:  # each rank owns its rows over the sp group; replicas differ by dp
            all_reduce_gradients(sharded, mesh.dp_group)
    grad_norm = clip_grad_norm(model.parameters(), r.train.clip_grad_norm, sharded, vp.shard if vp else None)
    if not torch.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"step {step + 1}: gradient norm is {grad_norm.item()}; the step was not applied")
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _with_sources(run, step, _step_record(run, mean_loss, grad_norm.item(), lr, global_valid, length, inputs))


def _skip_step(run: Run, step: int, length: int, inputs) -> dict:
    """A step whose every label is masked (chat prompts only, as a conversation cut into pieces can
    give): no label, so no loss and no update, on every rank alike (the count is all-reduced);
    the schedule still advances, so the run stays a function of the step."""
    log.warning("step %d: every label of this step is masked (prompt tokens only); no update", step + 1)
    lr = run.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step: intended here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        run.scheduler.step()
    record = _step_record(run, None, None, lr, 0, length, inputs)  # no loss: null in metrics.jsonl, not NaN
    return _with_sources(run, step, record | {"skipped": "no labels"})


def _with_sources(run: Run, step: int, record: dict) -> dict:
    """A mixture's input tokens per source in this step (all ranks' rows: each rank derives them
    from the sampler, no collective), so the dashboard shows the drawn shares."""
    names = getattr(run.data, "source_names", None)
    if names and len(names) > 1 and run.mesh.is_main:  # only the main rank logs
        record["source_tokens"] = dict(zip(names, run.data.source_tokens(step).tolist()))
    return record


def _deepspeed_step(run: Run, step: int, mean_loss: float, global_valid: float, length: int, inputs) -> dict:
    """engine.step clips (gradient_clipping), steps ZeRO's optimizer and zeroes the gradients."""
    lr = run.optimizer.param_groups[0]["lr"]
    run.engine.step()
    grad_norm = run.engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"step {step + 1}: gradient norm is {grad_norm}; DeepSpeed skipped the step")
    run.scheduler.step()
    return _step_record(run, mean_loss, grad_norm, lr, global_valid, length, inputs)


def _step_record(run: Run, mean_loss: float | None, grad_norm: float | None, lr: float, global_valid: float, length: int,
                 inputs) -> dict:
    mesh = run.mesh
    out = {"loss": mean_loss, "grad_norm": grad_norm, "lr": lr, "step_tokens": int(global_valid), "seq_len": int(length),
           "rows": int(inputs.shape[0]) * mesh.world // (run.sp_attention.sp if run.sp_attention else 1)}
    if run.documents is not None:  # packed documents: the zigzag split's balance in visible pairs
        before, after, kind = run.balance or (0.0, 0.0, "whole rows")
        ids = run.documents.numpy()
        out["documents_per_row"] = round(sum(len(np.unique(row[row != layout.PAD_DOCUMENT])) for row in ids)
                                         / len(ids), 3)
        out["attention_imbalance_zigzag"], out["attention_imbalance"] = round(before, 4), round(after, 4)
        out["document_layout"] = kind
    attention = run.sp_attention
    if attention is not None:
        out["sp_degree"], out["attention"] = attention.sp, attention.name
        if attention.name == "hybrid":
            out["attention_outer"], out["sp_inner"] = attention.plan.outer, attention.plan.sp_inner
        out.update(communicator_stats(run))
    vp = getattr(run.model, "vocab_parallel", None)
    if vp is not None:
        comm = communicator(vp.shard.group)
        out["vocab_parallel"], out["vocab_bytes_sent"] = vp.last, comm.stats()["bytes_sent"]
        comm.reset()
    return out


def communicator_stats(run: Run) -> dict:
    """Bytes this rank sent for attention in the step (then reset), for metrics; hybrid sums its
    inner (Ulysses) and outer groups and reports the busiest peer of either."""
    groups = run.sp_attention.process_groups()
    if not groups:
        return {}
    sent, busiest = 0, 0
    for group in groups:
        comm = communicator(group)
        stats = comm.stats()
        comm.reset()
        sent += stats["bytes_sent"]
        busiest = max(busiest, stats["max_bytes_per_pair_direction"])
    return {"attention_bytes_sent": sent, "attention_max_bytes_per_pair_direction": busiest}


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean loss over the held-out batches' labelled tokens (collective). None, with a warning,
    when they hold no label (chat data trained on replies only, held-out rows all prompt)."""
    r, mesh = run.recipe, run.mesh
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(r.eval.batches):
        inputs, labels, positions, seq_len = _shard(run, run.eval_data.step_batch(i))
        _set_documents(run, None)  # held-out rows are concat-and-chunk rows
        with _autocast(run):
            total[0] += run.model(inputs, position_ids=positions, labels=labels, seq_len=seq_len).double().cpu()
        total[1] += (labels != IGNORE_INDEX).sum().item()
    all_reduce_sum(total, mesh.grad_group)
    if total[1] == 0:
        if mesh.is_main:
            log.warning("eval: the %d held-out batch(es) hold no label (prompt tokens only under data.train_on="
                        "assistant); eval_loss is null. Raise eval.batches or data.eval_fraction", r.eval.batches)
        return None
    return (total[0] / total[1]).item()


def _eval_tasks(run: Run, tasks, metrics: Metrics, step: int, native: bool = False) -> dict:
    """eval.tasks at `step` (collective): numbers for the record; figures and tables to W&B."""
    numbers, done = tasks(step, native)
    for suite, results, folder in done:
        metrics.log_eval(step, suite + ("_native_rope" if native else ""), results, folder)
    return numbers


def save_checkpoint(run: Run, step: int) -> Path:
    """Collective (every rank writes its shard): model, optimizer, scheduler, sampler, RNG, counters."""
    state = {"step": step, "tokens": run.tokens_seen, "dp": run.mesh.dp_world, "sp": run.mesh.sp_world,
             "sharding": run.recipe.parallel.sharding, "run_id": run.run_id, "train_hparams": train_hparams(run.recipe),
             "adapter": run.lora.to_json() if run.lora is not None else None}  # what export merges
    sampler = getattr(run.data, "sampler", None)
    if sampler is not None:
        sampler.step = step
        state["sampler"] = sampler.state_dict()
    folder = run.run_dir / "checkpoints" / f"step-{step}"
    return ckpt.save(folder, run.model, run.optimizer, run.scheduler, state, run.recipe.train.keep_last,
                     tokenizer_dir=run.tokenizer_dir)


class StopSignal:
    """SIGTERM/SIGINT ask the run to stop after the current step with a checkpoint (a second
    SIGINT interrupts at once). Ranks agree on stopping through a max all-reduce of the flag."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, group) -> int:
        flag = torch.tensor([self.signum], dtype=torch.int64)
        if group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(flag.item())

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _guarded(run: Run, heartbeat: Heartbeat | None, step: int, fn, *args):
    """Runs fn; a failed collective becomes a RankFailure naming the rank that is gone."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if heartbeat is None:
            raise
        why = heartbeat.diagnose(step)
        if not why:
            raise
        raise RankFailure(f"rank {run.mesh.rank}: step {step} failed in a collective: {why} "
                          f"(first error: {str(e).splitlines()[0][:200]})") from e


def train(run: Run) -> dict:
    """The loop. Returns {"history": [...], "stopped": signal number or 0}."""
    r, mesh = run.recipe, run.mesh
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if mesh.is_main:
        schema.save(r, run.run_dir / "recipe.yaml")
        log.info("run folder: %s (run %s, %s)", run.run_dir.resolve(), run.run_id[:8] or "-",
                 f"resumed at step {run.start_step}" if run.start_step else "from step 0")
        log.info("run: %s", run.describe)
    started = time.perf_counter()
    metrics = _sinks(run)
    history = []
    stop = StopSignal()
    heartbeat = Heartbeat(mesh.rank, mesh.world) if mesh.world > 1 and "MASTER_ADDR" in os.environ else None
    eval_before = [evaluate(run)] if r.eval.every and run.start_step == 0 else None  # [None]: no label held out
    tasks = TrainingEvals(run) if r.eval.tasks else None
    tasks_before = None
    if tasks is not None and run.start_step == 0:
        tasks_before = _eval_tasks(run, tasks, metrics, 0)
        if r.eval.native_rope:
            tasks_before.update(_eval_tasks(run, tasks, metrics, 0, native=True))
    stopped = 0
    try:
        run.model.train()
        for step in range(run.start_step, r.train.max_steps):
            if heartbeat is not None:
                heartbeat.step(step + 1)
            if mesh.device.type == "cuda":  # peak_memory_bytes is this step's
                torch.cuda.reset_peak_memory_stats(mesh.device)
            every = r.memory.elimination.recall_every
            if every and step % every == 0 and getattr(run.model, "elimination", None):
                elimination.measure_recall(run.model.elimination)  # this step's first forward, every layer
            t0 = time.perf_counter()
            out = _guarded(run, heartbeat, step + 1, train_step, run, step)
            seconds = time.perf_counter() - t0
            run.tokens_seen += out["step_tokens"]
            record = {
                "step": step + 1, "loss": out["loss"], "tokens": run.tokens_seen, "step_tokens": out["step_tokens"],
                "tokens_per_second": out["step_tokens"] / seconds, "lr": out["lr"], "grad_norm": out["grad_norm"],
                "step_seconds": seconds, "peak_memory_bytes": peak_memory_bytes(mesh.device),
                "seq_len": out["seq_len"], "rows": out["rows"],
            }
            record.update({k: out[k] for k in ("sp_degree", "attention", "attention_outer", "sp_inner",
                                               "attention_bytes_sent", "attention_max_bytes_per_pair_direction",
                                               "vocab_parallel", "vocab_bytes_sent", "documents_per_row",
                                               "attention_imbalance_zigzag", "attention_imbalance", "document_layout",
                                               "source_tokens", "skipped")
                           if k in out})
            record.update(memory_metrics(run.model))
            if not history:  # the first record of this run names the kernels that ran
                record.update({k: v for k, v in (run.describe or {}).items() if k in ("attention_kernel", "loss_impl")})
            if eval_before is not None:
                record["eval_loss_before"], eval_before = eval_before[0], None
            if r.eval.every and (step + 1) % r.eval.every == 0:
                record["eval_loss"] = evaluate(run)
                run.model.train()
            if tasks_before:
                record.update({k.replace("eval/", "eval_before/", 1): v for k, v in tasks_before.items()})
                tasks_before = None
            last = step + 1 == r.train.max_steps
            if tasks is not None and (last or (r.eval.tasks_every and (step + 1) % r.eval.tasks_every == 0)):
                record.update(_eval_tasks(run, tasks, metrics, step + 1))
                if last:
                    for folder in tasks.compare():
                        log.info("eval: %s", folder)
            history.append(record)
            if (step + 1) % r.log.every == 0 or step + 1 == r.train.max_steps:
                metrics.log(record)
            saved = bool(r.train.checkpoint_every and (step + 1) % r.train.checkpoint_every == 0)
            if saved:
                _guarded(run, heartbeat, step + 1, save_checkpoint, run, step + 1)
            stopped = _guarded(run, heartbeat, step + 1, stop.agreed, mesh.grad_group)
            if stopped:
                if not saved:
                    _guarded(run, heartbeat, step + 1, save_checkpoint, run, step + 1)
                if mesh.is_main:
                    log.warning("stopped by %s after step %d; checkpoint saved in %s", signal.Signals(stopped).name,
                                step + 1, run.run_dir / "checkpoints" / f"step-{step + 1}")
                break
        if not stopped and history and not saved and r.parallel.sharding != "deepspeed":
            _guarded(run, heartbeat, r.train.max_steps, save_checkpoint, run, r.train.max_steps)  # the final one
        if r.train.export and not stopped:
            export(run)
    finally:
        stop.restore()
        if heartbeat is not None:
            heartbeat.stop()
        metrics.close()
    _summary(run, history, stopped, time.perf_counter() - started)
    return {"history": history, "stopped": stopped}


def export(run: Run) -> None:
    state = full_state_dict(run.model)  # collective under FSDP2
    if run.mesh.is_main:
        if run.lora is not None:  # the adapters folded into the base weights (peft's merge): plain HF names
            state = merged_state_dict(run.model.config, state, run.lora)
        out = save_folder(run.model, run.run_dir / "export", tokenizer_dir=run.tokenizer_dir, state=state,
                          force=True, protected=(run.run_dir / "checkpoints",))  # the run's own export
        log.info("exported HF model to %s", out)
    if run.mesh.world > 1:
        torch.distributed.barrier()
