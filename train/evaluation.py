"""Long-context evaluation on the training path: `longctx eval` and the trainer's eval.tasks.

The model is the one training builds (train/build.build_model: the same blocks, RoPE scaling,
attention schedule at sp > 1, memory policy); a sequence is split zigzag over the sp group as a
training row is, the forward runs without a graph, and eval/score.py projects only the positions
it scores. Data-parallel groups share a cell's samples.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.tokenize import ByteTokenizer, load_tokenizer
from ..eval import runner
from ..eval.runner import EvalError, Ranks, Settings
from ..eval.score import Scorer
from ..eval.tasks import Generator, TaskError
from ..models.hf import TOKENIZER_FILES
from ..parallel import layout, vocab
from ..parallel import mesh as mesh_lib
from ..recipes.schema import bucketed

log = logging.getLogger("longctx")


def training_forward(model, mesh: mesh_lib.Mesh, sp_attention, pad_id: int, autocast_dtype):
    """ids [1, S] -> (this rank's last hidden states [n, D], their global positions [n])."""

    def forward(ids: torch.Tensor):
        ids = ids.to(mesh.device)
        S = ids.shape[1]
        positions, seq_len = torch.arange(S, device=mesh.device)[None], None
        if sp_attention is not None:
            sp = mesh.sp_world
            sp_attention.set_step(sp, layout.padded_length(S, sp), rows=1)
            ids, positions, _ = layout.split_batch(ids, torch.full_like(ids, layout.IGNORE_INDEX), mesh.sp_rank, sp,
                                                   pad_id)
            seq_len = S  # the sequence's own length (dynamic RoPE's), as one process has it
        autocast = (torch.autocast(mesh.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else torch.autocast(mesh.device.type, enabled=False))
        with torch.no_grad(), autocast:
            hidden = model(ids, position_ids=positions if sp_attention is not None else None, seq_len=seq_len)
        return hidden[0], positions[0]

    return forward


def output_weight(model, device: torch.device) -> torch.Tensor:
    """The loss head's weight, whole, on `device` (gathered when FSDP2 holds it sharded: every rank
    calls; FSDP2's cpu_offload keeps the shard on the host, so it moves first)."""
    w = model.output_weight
    if hasattr(w, "full_tensor"):
        return w.to(device).full_tensor()
    vp = getattr(model, "vocab_parallel", None)  # rows sharded over the vocabulary group: gathered
    return w.to(device) if vp is None else vocab.full_weight(w.to(device), vp.shard)


def scorer_for(model, mesh: mesh_lib.Mesh, sp_attention, pad_id: int, autocast_dtype) -> Scorer:
    return Scorer(training_forward(model, mesh, sp_attention, pad_id, autocast_dtype),
                  lambda: output_weight(model, mesh.device), mesh.sp_group if sp_attention is not None else None)


def ranks_of(mesh: mesh_lib.Mesh, sharded: bool = False) -> Ranks:
    """How the ranks share a cell. `sharded` (FSDP2 holds the weights over every rank, so each
    forward is collective over the world): every data-parallel group runs every sample (the same
    forwards in the same order everywhere) and only the first group's first rank contributes."""
    group = dist.group.WORLD if mesh.world > 1 else None
    if sharded:
        return Ranks(0, 1, group, mesh.sp_rank == 0 and mesh.dp_rank == 0, mesh.is_main)
    return Ranks(mesh.dp_rank, mesh.dp_world, group, mesh.sp_rank == 0, mesh.is_main)


def eval_tokenizer(kind: str, model_dir: Path | None, vocab_size: int):
    """model.tokenizer; `auto` on a folder without tokenizer files (or a random init) whose vocabulary
    is the byte tokenizer's: the byte tokenizer (the tiny test models)."""
    has_files = model_dir is not None and any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES
                                              if f != "generation_config.json")  # the rest are the tokenizer's
    if kind == "auto" and not has_files and vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    return load_tokenizer(kind, model_dir)


class EvalData:
    """The text the tasks need, read once: a token stream for the needle haystacks (the held-out
    documents first, then the rest) and the held-out documents for ppl."""

    def __init__(self, store, held_out: np.ndarray, others: np.ndarray, eos: int | None) -> None:
        self.store, self.held_out, self.others, self.eos = store, held_out, others, eos

    def documents(self) -> list[np.ndarray]:
        return [np.asarray(self.store.document(int(i))) for i in self.held_out]

    def haystack(self, tokens: int) -> np.ndarray:
        """About `tokens` of text (whole documents until there are that many): the held-out ones
        first, then the others."""
        docs, total = [], 0
        for i in [*self.held_out, *self.others]:
            doc = np.asarray(self.store.document(int(i)), dtype=np.int64)
            docs.append(doc[doc != self.eos] if self.eos is not None else doc)
            total += len(docs[-1])
            if total >= tokens:
                break
        return np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)


def run_suite(suite: str, settings: Settings, scorer: Scorer, tokenizer, data: EvalData, out: Path, ranks: Ranks,
              device, progress: bool = True) -> dict:
    try:
        if suite == "ppl":
            return runner.run(settings, scorer, out, documents=data.documents(), ranks=ranks, device=device,
                              progress=progress)
        # the haystack: a few times the longest context, so samples start at different places
        generator = Generator(tokenizer, data.haystack(4 * max(settings.lengths)), seed=settings.seed)
        return runner.run(settings, scorer, out, generator=generator, ranks=ranks, device=device, progress=progress)
    except TaskError as e:
        raise EvalError(str(e)) from None


# --- `longctx eval` --------------------------------------------------------------------------------
def eval_command(args) -> int:
    """`longctx eval SUITE MODEL --lengths ... --out DIR` (or `--compare DIR ...`)."""
    from ..recipes import schema
    from .build import _pad_id, allocator_settings, build_model, held_out_split, token_store

    out = Path(args.out)
    if args.compare:
        summary = runner.compare([Path(f) for f in args.compare], out, marks=tuple(args.mark or ()))
        print(json.dumps({"figure": str(out / summary["figure"]), "models": [m["label"] for m in summary["models"]]}))
        return 0
    if not args.model:
        raise EvalError("give a MODEL (an HF folder, export, checkpoint, hub name or 'default'), or --compare DIRS")
    settings = Settings(
        suite=args.suite, lengths=runner.parse_lengths(args.lengths), depths=runner.parse_depths(args.depths),
        samples=args.samples, seed=args.seed, tasks=args.tasks.split(",") if args.tasks else [],
        documents=args.documents, bucket=args.bucket, label=args.label or "", model=args.model,
        overrides=[f"data.source={args.source}", f"data.eval_fraction={args.held_out}", *(args.set or [])])
    if (out / runner.RESULTS).exists():
        runner.read_results(out, settings)  # other settings: refused before any work
    recipe = schema.load(None, [f"model.path={args.model}", f"parallel.sp_degree={args.sp}", f"run.seed={args.seed}",
                                "log.wandb=false", *settings.overrides])
    if recipe.parallel.sharding == "deepspeed":
        raise EvalError("--set parallel.sharding=deepspeed: evaluation runs unsharded or under fsdp2")
    allocator_settings(recipe)
    from ..kernels.capability import default_device

    try:
        device = default_device(recipe.run.device)
    except RuntimeError as e:
        raise schema.RecipeError(str(e)) from None
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    try:
        mesh = mesh_lib.init(device, recipe.parallel.backend, recipe.parallel.timeout_seconds, recipe.parallel.sp_degree)
    except mesh_lib.MeshError as e:
        raise schema.RecipeError(f"--sp {args.sp}: {e}") from None
    try:
        model, model_dir, sp_attention = build_model(recipe, mesh)
        model.eval()
        tokenizer = eval_tokenizer(recipe.model.tokenizer, model_dir, model.config.vocab_size)
        store = token_store(recipe, tokenizer, mesh)
        held, others = held_out_split(store.num_documents, recipe.run.seed, recipe.data.eval_fraction)
        if not len(held):
            held, others = others, held[:0]  # --held-out 0: every document
        data = EvalData(store, held, others, getattr(tokenizer, "eos_token_id", None))
        scorer = scorer_for(model, mesh, sp_attention, _pad_id(tokenizer),
                            torch.bfloat16 if recipe.run.dtype == "bf16" else None)
        results = run_suite(args.suite, settings, scorer, tokenizer, data, out,
                            ranks_of(mesh, recipe.parallel.sharding == "fsdp2"), mesh.device)
        if mesh.is_main:
            print(json.dumps(_summary(results, out)))
    finally:
        mesh_lib.destroy()
    return 0


def _summary(results: dict, out: Path) -> dict:
    cells = results["cells"]
    by_length: dict[int, list[float]] = {}
    for c in cells:
        by_length.setdefault(c["length"], []).append(c["score"])
    return {"results": str(out / runner.RESULTS), "figures": [str(out / f) for f in results.get("figures", [])],
            "score_by_length": {n: float(np.mean(v)) for n, v in sorted(by_length.items())}}


# --- eval.tasks in a training run ------------------------------------------------------------------
class TrainingEvals:
    """eval.tasks on the run's own model (its schedules, memory policy and sharding): each suite's
    results under <run>/eval/step-N/<suite>/ and a few numbers for the step's metrics record:
    `eval/<suite>/score` (mean exact match, or mean loss for ppl) and per length."""

    def __init__(self, run) -> None:
        self.run = run
        r = run.recipe
        e = r.eval
        longest = r.data.max_len if bucketed(r) else r.data.seq_len
        self.lengths = list(e.lengths) or [longest]
        cfg = run.model.config
        self.tokenizer = eval_tokenizer(r.model.tokenizer, run.tokenizer_dir, cfg.vocab_size)
        self.scorer = scorer_for(run.model, run.mesh, run.sp_attention, run.pad_id, run.autocast_dtype)
        self._data = None

    def data(self) -> EvalData:
        if self._data is None:
            from .build import held_out_split, token_store

            r = self.run.recipe
            store = token_store(r, self.tokenizer, self.run.mesh)
            held, others = held_out_split(store.num_documents, r.run.seed, r.data.eval_fraction)
            self._data = EvalData(store, held, others, getattr(self.tokenizer, "eos_token_id", None))
        return self._data

    def __call__(self, step: int, native: bool = False) -> tuple[dict, list[tuple[str, dict, Path]]]:
        """(metrics, [(suite, results, folder)]) after evaluating at `step`; `native`: the model
        with its own RoPE config instead of the recipe's (same weights), in step-N-native-rope/."""
        r, mesh = self.run.recipe, self.run.mesh
        metrics, done = {}, []
        name = f"step-{step}" + ("-native-rope" if native else "")
        label = f"step {step}" + (", the model's own RoPE" if native else ", before training" if step == 0 else "")
        prefix = "eval_native_rope" if native else "eval"
        model = self.run.model
        config = model.config
        if native:
            model.config = self.run.native_config
        try:
            for suite in r.eval.tasks:
                # what the cells depend on besides the step: the run (its weights) and the RoPE in use
                settings = Settings(suite=suite, lengths=self.lengths, depths=list(r.eval.depths),
                                    samples=r.eval.samples, seed=r.run.seed, documents=r.eval.documents, label=label,
                                    model=f"{self.run.run_dir} (run {self.run.run_id})",
                                    overrides=[f"rope={model.config.rope}", f"data.source={r.data.source}",
                                               f"data.eval_fraction={r.data.eval_fraction}"]
                                    + ([f"data.sources={[s.name or s.path for s in r.data.sources]}"]
                                       if r.data.sources else []))
                out = self.run.run_dir / "eval" / name / suite
                self._set_aside_other(out, settings)
                results = run_suite(suite, settings, self.scorer, self.tokenizer, self.data(), out,
                                    ranks_of(mesh, r.parallel.sharding == "fsdp2"), mesh.device, progress=False)
                cells = results["cells"]
                metrics[f"{prefix}/{suite}/score"] = float(np.mean([c["score"] for c in cells]))
                for n in settings.lengths:
                    metrics[f"{prefix}/{suite}/score@{n}"] = float(np.mean([c["score"] for c in cells
                                                                            if c["length"] == n]))
                if suite != "ppl":
                    metrics[f"{prefix}/{suite}/answer_token_logprob"] = float(np.mean([c["answer_token_logprob"]
                                                                                       for c in cells]))
                done.append((suite, results, out))
                if mesh.is_main:
                    log.info("eval %s, %s: %s (%s)", suite, label, ", ".join(
                        f"{n}: {metrics[f'{prefix}/{suite}/score@{n}']:.3f}" for n in settings.lengths),
                        "loss" if suite == "ppl" else "exact match")
        finally:
            model.config = config
        model.train()
        return metrics, done

    def _set_aside_other(self, out: Path, settings: Settings) -> None:
        """Results of other settings in `out` (the run resumed with other eval.* keys): renamed
        beside it, never mixed in or lost; every rank waits for the rename."""
        mesh = self.run.mesh
        if mesh.is_main and (out / runner.RESULTS).exists():
            try:
                runner.read_results(out, settings)
            except EvalError as e:
                aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                out.rename(aside)
                log.warning("eval: %s: set aside as %s (%s)", out, aside.name, e)
        if mesh.world > 1:
            dist.barrier()

    def compare(self) -> list[Path]:
        """The run's evaluations side by side (native RoPE, the first, the last) in eval/compare/SUITE/."""
        root = self.run.run_dir / "eval"
        steps = sorted((p for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit()),
                       key=lambda p: int(p.name.removeprefix("step-")))
        folders = ([root / "step-0-native-rope"] if (root / "step-0-native-rope").is_dir() else []) + (
            [steps[0], steps[-1]] if len(steps) > 1 else steps)
        if len(folders) < 2 or not self.run.mesh.is_main:
            return []
        native = self.run.native_config
        marks = (native.max_position_embeddings,) if native is not None else ()
        made = []
        for suite in self.run.recipe.eval.tasks:
            out = root / "compare" / suite
            try:
                runner.compare([f / suite for f in folders], out, marks=marks)
            except (EvalError, OSError) as e:  # a figure is not worth the run's end (final checkpoint, export)
                log.warning("eval: no comparison figure for %s: %s", suite, e)
                continue
            made.append(out)
        return made


def check_tasks(tasks: list[str], lengths: list[int], tokenizer_kind: str, tokenizer_dir, vocab_size: int) -> str | None:
    """Why eval.tasks cannot run at eval.lengths with this tokenizer (None when they can): one
    sample of each task at the shortest length, before the run starts."""
    from ..eval.tasks import SUITES

    tokenizer = eval_tokenizer(tokenizer_kind, tokenizer_dir, vocab_size)
    generator = Generator(tokenizer, None)
    for suite in tasks:
        for task in SUITES.get(suite, ()):
            try:
                generator.sample(task, min(lengths), 0.5)
            except TaskError as e:
                return str(e)
    return None
