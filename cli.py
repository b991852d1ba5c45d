"""`longctx` command line: train, eval, export, convert, data, plan, recipe, elimination fit.

Errors the user can fix (recipe keys, data, model folders, checkpoints) print one message naming
the key or file and exit with status 2; nothing written earlier is touched.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longctx", description="Long-context fine-tuning for HF decoder LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a recipe (torchrun for several processes)")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="a.b.c=value overrides")

    e = sub.add_parser("export", help="export a checkpoint folder to an HF folder (a LoRA run's merged)")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="cast weights (default: as saved)")
    e.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT (never the checkpoint, its run folder or a folder holding them)")
    e.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run (model.adapter): write a peft adapter folder (adapter_config.json + "
                        "adapter_model.safetensors) for PeftModel.from_pretrained instead of the merged model")

    c = sub.add_parser("convert", help="convert model files")
    csub = c.add_subparsers(dest="format", required=True)
    g = csub.add_parser("gguf", help="a Llama-family GGUF file -> HF safetensors folder + tokenizer")
    g.add_argument("file")
    g.add_argument("out")
    g.add_argument("--force", action="store_true", help="replace a non-empty OUT (never one holding FILE)")

    d = sub.add_parser("data", help="inspect a recipe's data")
    dsub = d.add_subparsers(dest="action", required=True)
    di = dsub.add_parser("inspect", help="length histogram, buckets, tokens kept/dropped, attention FLOPs")
    di.add_argument("recipe")
    di.add_argument("overrides", nargs="*")
    di.add_argument("--png", help="also write a histogram PNG here")

    pl = sub.add_parser("plan", help="per-GPU memory, step time, the longest sequence that fits, attention schedules")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    pl.add_argument("--gpus-per-node", type=int, default=None, help="default min(gpus, 8)")
    pl.add_argument("--gpu-mem", default="80GiB", help="memory per GPU (default 80GiB)")
    pl.add_argument("--host-mem", default="1TiB", help="host memory per node for activations (default 1TiB)")
    pl.add_argument("--sharding", default="fsdp2", choices=["none", "fsdp2", "zero1", "zero2", "zero3"])
    pl.add_argument("--seq-len", type=int, default=None, help="default: the recipe's longest length")
    pl.add_argument("--tflops", type=float, default=None,
                    help="sustained TFLOP/s per GPU, also attention's (default: parallel.attention_tflops if a number, else 300)")
    pl.add_argument("--link", choices=["nvswitch", "nvlink_mesh", "pcie", "cpu_gloo"], default=None,
                    help="intra-node link class for the attention schedules (default: parallel.link unless auto, else nvswitch)")
    pl.add_argument("--inter-gbps", type=float, default=None,
                    help="per-GPU NIC Gb/s each direction between nodes (default: parallel.inter_node_gbps)")
    pl.add_argument("--link-gbps", type=float, default=25.0, help="GPU<->host GB/s per GPU (default 25)")
    pl.add_argument("--runtime-mem", default="1GiB", help="CUDA context / process baseline (default 1GiB)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of the table (exit 1 when it does not fit)")
    _add_eval_parser(sub)
    _add_elimination_parser(sub)
    r = sub.add_parser("recipe", help="validate / show a recipe, or print the reference table")
    rsub = r.add_subparsers(dest="action", required=True)
    show = rsub.add_parser("show", help="print the resolved recipe")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    rsub.add_parser("reference", help="print the recipe key reference (markdown)")
    return p


def _add_elimination_parser(sub) -> None:
    e = sub.add_parser("elimination", help="LeMo token elimination: fit the pattern predictors")
    esub = e.add_subparsers(dest="action", required=True)
    f = esub.add_parser("fit", help="train the recipe's pattern predictors against the exact block scores",
                        description="Trains one pattern predictor per eliminating layer of the recipe (model frozen) "
                                    "against the exact block scores; resumable (OUT/fit_state.pt); writes "
                                    "OUT/predictors.safetensors (memory.elimination.predictors) and OUT/fit.json.")
    f.add_argument("recipe")
    f.add_argument("overrides", nargs="*")
    f.add_argument("--out", required=True, help="folder for predictors.safetensors, fit.json and fit_state.pt")
    f.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    f.add_argument("--samples", type=int, default=24, help="training rows (default 24)")
    f.add_argument("--held-out", type=int, default=4, help="held-out rows for the recall (default 4)")
    f.add_argument("--epochs", type=int, default=40, help="passes over the training rows (default 40)")
    f.add_argument("--batch", type=int, default=4, help="rows per optimizer step (default 4)")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    f.add_argument("--token-rank", type=int, default=32, help="per-token first layer size (default 32)")
    f.add_argument("--width", type=int, default=128, help="width of the towers (default 128)")
    f.add_argument("--heads", type=int, default=4, help="predicted heads (default 4)")
    f.add_argument("--head-dim", type=int, default=32, help="size of a predicted head (default 32)")
    f.add_argument("--save-every", type=int, default=10, help="epochs between saves of fit_state.pt (default 10)")


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="long-context evaluation: passkey, niah, ruler (synthetic tasks), ppl (loss by position)",
                       description="Runs on the training path (the same model code, attention schedules and memory "
                                   "policies; under torchrun with --sp N the sequence is split over N ranks). Writes "
                                   "OUT/results.json after every cell (a rerun with the same options resumes) and PNGs.")
    e.add_argument("suite", choices=("passkey", "niah", "ruler", "ppl"))
    e.add_argument("model", nargs="?", help="an HF folder, export, training checkpoint (step-N), hub name or 'default'")
    e.add_argument("--lengths", default="4k", help="context lengths, e.g. 2k,4k,8k,16384 (k = 1024)")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (fractions of the context)")
    e.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth) cell")
    e.add_argument("--tasks", default="", help="ruler: a subset of niah_single,niah_multikey,niah_multivalue,"
                                               "niah_multiquery,variable_tracking")
    e.add_argument("--documents", type=int, default=4, help="ppl: held-out windows per length")
    e.add_argument("--bucket", type=int, default=512, help="ppl: positions per bucket")
    e.add_argument("--source", default="default", help="text for haystacks and ppl (data.source; default corpus)")
    e.add_argument("--held-out", type=float, default=0.05,
                   help="fraction of the source's documents held out as a run with the same run.seed holds them out "
                        "(ppl reads those; 0 = every document)")
    e.add_argument("--seed", type=int, default=0, help="samples' seed and the held-out split's run.seed")
    e.add_argument("--sp", type=int, default=1, help="sequence-parallel degree under torchrun (divides the world size)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="recipe keys for the model, e.g. model.rope.type=yarn, model.rope.factor=2, run.dtype=bf16, "
                        "parallel.attention=token_ring, memory.policy=full (repeatable)")
    e.add_argument("--label", help="the model's name on figures (default: its folder name)")
    e.add_argument("--out", required=True, help="output folder (results.json, PNGs)")
    e.add_argument("--compare", nargs="+", metavar="DIR", help="draw earlier --out folders on one figure in --out")
    e.add_argument("--mark", type=int, action="append", help="--compare ppl: a vertical line at this position "
                                                             "(e.g. the native context length; repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[longctx] %(message)s", stream=sys.stderr)
    from .data.sources import DataError
    from .eval.runner import EvalError
    from .models.config import ModelConfigError
    from .models.hf import CheckpointError
    from .recipes.schema import RecipeError

    user_errors = (RecipeError, DataError, ModelConfigError, CheckpointError, EvalError)
    try:
        return _dispatch(args)
    except user_errors as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from .recipes.schema import RecipeError

    if args.command == "train":
        return _train(args)
    if args.command == "export":
        import torch

        from .train.export import export_checkpoint

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)
        print(export_checkpoint(args.checkpoint, args.out, dtype=dtype, force=args.force,
                                adapter_only=args.adapter_only))
        return 0
    if args.command == "convert":
        from .models.hf import convert_gguf

        print(convert_gguf(args.file, args.out, force=args.force))
        return 0
    if args.command == "data":
        import json

        from .recipes import schema
        from .train.data_report import inspect, save_png

        report = inspect(schema.load(args.recipe, args.overrides))
        print(json.dumps(report, indent=2))
        if args.png:
            print(save_png(report, args.png))
        return 0
    if args.command == "plan":
        import json

        from .recipes import schema
        from .train.build import plan_inputs
        from .train.plan_report import PlanError, format_plan, parse_bytes, plan

        if args.gpus < 1:
            raise RecipeError(f"--gpus={args.gpus}: expected at least 1")
        try:
            sizes = [parse_bytes(v, k) for k, v in (("--gpu-mem", args.gpu_mem), ("--host-mem", args.host_mem),
                                                    ("--runtime-mem", args.runtime_mem))]
        except ValueError as e:
            raise RecipeError(str(e)) from None
        recipe = schema.load(args.recipe, args.overrides)
        shape, inputs = plan_inputs(recipe)
        par = recipe.parallel
        recipe_tflops = getattr(par, "attention_tflops", "auto")
        tflops = args.tflops if args.tflops is not None else (None if recipe_tflops == "auto" else float(recipe_tflops))
        if tflops is not None and tflops <= 0:
            raise RecipeError(f"--tflops={tflops}: expected a positive TFLOP/s")
        try:
            report = plan(shape, inputs, args.gpus, sizes[0], sizes[1], args.gpus_per_node, args.sharding, sizes[2],
                          300.0 if tflops is None else tflops, args.link_gbps, args.seq_len)
        except PlanError as e:
            raise RecipeError(str(e)) from None
        if report["sp_degree"] > 1:
            report["attention"] = _plan_attention(args, par, shape, report, tflops, inputs["autocast"])
        print(json.dumps(report, indent=2) if args.json else format_plan(report))
        return 0 if report["fits"] else 1  # scripts can ask "does it fit?" by the exit status
    if args.command == "eval":
        from .train.evaluation import eval_command

        return eval_command(args)
    if args.command == "elimination":
        from .train.elimination_fit import fit_command

        return fit_command(args)
    if args.command == "recipe":
        from omegaconf import OmegaConf

        from .recipes import schema

        if args.action == "reference":
            print(schema.reference_markdown())
        else:
            print(OmegaConf.to_yaml(OmegaConf.create(schema.load(args.recipe, args.overrides).to_dict())))
        return 0
    raise AssertionError(args.command)


def _plan_attention(args, par, shape, report: dict, tflops: float | None, autocast: bool) -> dict:
    """The attention schedules on the machine the flags (else the recipe's parallel keys) describe;
    tflops None: the link's device default (300 on GPUs)."""
    from .parallel.topology import INTRA_LINKS, make_machine
    from .recipes.schema import RecipeError
    from .train.plan_report import attention_plan

    recipe_link = getattr(par, "link", "auto")
    link = args.link or (recipe_link if recipe_link in INTRA_LINKS else "nvswitch")
    gbps = args.inter_gbps if args.inter_gbps is not None else float(getattr(par, "inter_node_gbps", 400.0))
    if gbps <= 0:
        raise RecipeError(f"--inter-gbps={gbps}: expected a positive number of Gb/s")
    sp_inner = getattr(par, "sp_inner", "auto")
    machine = make_machine(link, report["gpus_per_node"], gbps, tflops=tflops)
    return attention_plan(shape, report["seq_len"], report["sp_degree"], machine, 2 if autocast else 4,
                          sp_inner=None if sp_inner == "auto" else int(sp_inner), memo=report["policy"] != "none")


def _train(args) -> int:
    from .parallel import mesh
    from .parallel.health import RankFailure
    from .recipes import schema
    from .train.build import build
    from .train.trainer import NonFiniteLossError, train

    recipe = schema.load(args.recipe, args.overrides)  # fails before any work starts
    try:
        run = build(recipe)
        stopped = train(run)["stopped"]
    except (NonFiniteLossError, RankFailure) as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return 1
    finally:
        mesh.destroy()
    return 128 + stopped if stopped else 0  # stopped by a signal: checkpoint saved, the job did not finish


if __name__ == "__main__":
    raise SystemExit(main())
