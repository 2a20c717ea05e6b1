"""`lmforge quantize` and `lmforge prune`: argument parsing only (the work is `lmforge.compress.run`)."""

from __future__ import annotations

import argparse
import json

from lmforge.cli_parser import add_threads_flag, apply_threads

MODEL_HELP = "checkpoint folder, run folder, .gguf file, or a sample name (smollm2)"


def cmd_quantize(args: argparse.Namespace) -> int:
    from lmforge.compress.run import describe, quantize_command

    apply_threads(args.threads)
    summary = quantize_command(args.model, args.method, args.bits, args.output, group_size=args.group_size,
                               calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                               act_order=args.act_order, damp=args.damp, head=args.head,
                               activations=args.activations, alpha=args.alpha,
                               measure=args.measure, heldout=args.heldout, seed=args.seed, quiet=args.quiet,
                               qat={k: v for k in QAT_FLAGS if (v := getattr(args, k)) is not None})
    print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from lmforge.compress.run import describe, prune_command

    apply_threads(args.threads)
    summary = prune_command(args.model, args.method, args.sparsity, args.output, calibration=args.calibration,
                            samples=args.samples, seq_len=args.seq_len, damp=args.damp, measure=args.measure,
                            heldout=args.heldout, seed=args.seed, quiet=args.quiet)
    print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


QAT_FLAGS = ("init", "data", "steps", "lr", "batch", "ranges")


def _qat_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("qat (quantization-aware training; docs/compression.md)")
    g.add_argument("--init", choices=("rtn", "gptq", "awq"), default=None,
                   help="the rounding training starts from (default rtn; gptq/awq use --calibration)")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text to train on: files, folders of .txt/.rst/.md, or token shard folders (default: "
                        "the calibration default, the Python HOWTOs)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the weights (default 1e-5)")
    g.add_argument("--batch", type=int, default=None, help="windows of --seq-len tokens per step (default 8)")
    g.add_argument("--ranges", choices=("learn", "refit"), default=None,
                   help="learn: steps and offsets train with the weights (LSQ, default); refit: each group's "
                        "min/max at every step")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--output", "-o", required=True, help="the folder to write (replaced atomically)")
    p.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                   help="text files, folders of .txt/.rst/.md, or token shard folders (default: the Python "
                        "HOWTOs from the web sample)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ/SparseGPT: fraction of mean(diag H) added to H's diagonal (default 0.01)")
    p.add_argument("--measure", action="store_true",
                   help="perplexity before and after on held-out text (default: the Python tutorial)")
    p.add_argument("--heldout", nargs="+", default=None, metavar="PATH", help="held-out text for --measure")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_threads_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `quantize` and `prune` to the `lmforge` subcommands."""
    p = sub.add_parser("quantize", help="round a model's weights to 8, 4 or 3 bits (rtn, gptq, awq) into a "
                                        "folder the engine runs",
                       description="Quantize every linear layer of a model into the engine's int8/int4 "
                                   "layers. rtn rounds each group to nearest (no data); gptq and awq use "
                                   "calibration text; smoothquant (8 bits) also rounds the activations "
                                   "(W8A8). The output folder loads with generate, chat and serve.")
    p.add_argument("--method", required=True, choices=("rtn", "gptq", "awq", "smoothquant", "qat"))
    p.add_argument("--bits", type=int, required=True, choices=(8, 4, 3, 2),
                   help="8: per output channel, symmetric; 4/3/2: groups of --group-size inputs, asymmetric")
    p.add_argument("--group-size", type=int, default=64,
                   help="inputs per step/offset for 2-4 bits: a multiple of 32 dividing every layer's inputs "
                        "(default 64; SmolLM2's 576 inputs rule out 128)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: round the inputs with the largest activations first (gptq's default: on; "
                        "it halved the 4-bit loss on SmolLM2, docs/compression.md)")
    p.add_argument("--activations", choices=("dynamic", "static"), default="dynamic",
                   help="smoothquant: int8 activation scales per token at run time (default) or one per "
                        "layer from the calibration text")
    p.add_argument("--alpha", type=float, default=None,
                   help="smoothquant: how much of the activations' range moves into the weights, 0..1 "
                        "(default: searched per layer group; the paper's fixed choice is 0.5)")
    p.add_argument("--head", choices=("int8", "same", "none"), default="int8",
                   help="the LM head: int8 per channel (default, as GGUF files keep it), the body's grid by "
                        "round-to-nearest, or float")
    _qat_flags(p)
    _common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("prune", help="zero half (or 2 of every 4) of a model's weights (magnitude, wanda, "
                                     "sparsegpt), or remove MLP channels, head groups or blocks",
                       description="magnitude, wanda and sparsegpt zero weights of every linear layer of "
                                   "every block (embeddings and head untouched): a float checkpoint of the "
                                   "same size with the zeros in place. channels, heads and layers remove "
                                   "that fraction of the MLP channels, key/value head groups or blocks: a "
                                   "smaller model that decodes faster.")
    p.add_argument("--method", required=True,
                   choices=("magnitude", "wanda", "sparsegpt", "channels", "heads", "layers"))
    p.add_argument("--sparsity", required=True,
                   help="a fraction (0.5) or an n:m pattern (2:4); for channels/heads/layers the fraction "
                        "removed (0.25)")
    _common(p)
    p.set_defaults(func=cmd_prune)
    _register_distill(sub)


def cmd_distill(args: argparse.Namespace) -> int:
    from lmforge.compress.distill_run import DistillConfig, describe, distill
    from lmforge.config import load_config

    apply_threads(args.threads)
    flags = {"teacher": args.teacher, "student": args.student, "data.folder": args.data,
             "output": args.output, "distill.kind": args.kind, "distill.temperature": args.temperature,
             "distill.alpha": args.alpha}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    summary = distill(load_config(DistillConfig, args.config, overrides), quiet=args.quiet)
    print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


def _register_distill(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli_parser import add_config_command

    p = add_config_command(
        sub, "distill", config_help="YAML recipe, e.g. configs/distill/smollm2-to-tiny.yaml",
        help="train a small student on a teacher's next-token distributions (knowledge distillation)",
        description="Train a student (a preset, randomly initialised, or a checkpoint) on token shards made "
                    "with the teacher's tokenizer, against the teacher's softened distributions (forward or "
                    "reverse KL) mixed with the next-token loss. Any recipe key can be overridden as "
                    "--section.key=value (--train.steps=50, --student_config.d_model=128). Rerunning into "
                    "the same output resumes from its newest checkpoint.")
    p.add_argument("--teacher", default=None, help=f"{MODEL_HELP} (default: the recipe's)")
    p.add_argument("--student", default=None,
                   help="a model preset (lmforge info lists them; vocabulary: the teacher's) or a checkpoint "
                        "folder (default: the recipe's)")
    p.add_argument("--data", default=None, metavar="SHARDS",
                   help="token shards from `lmforge tokenize -t TEACHER` (default: the recipe's)")
    p.add_argument("--output", "-o", default=None, help="run folder (default: the recipe's, runs/distill)")
    p.add_argument("--kind", choices=("forward", "reverse"), default=None,
                   help="forward: KL(teacher || student), mass-covering; reverse: KL(student || teacher), "
                        "mode-seeking (default: the recipe's, forward)")
    p.add_argument("--temperature", type=float, default=None,
                   help="both softmaxes at logits / T, the KL scaled by T^2 (default: the recipe's, 2)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the teacher's term, 1 - alpha on the hard labels; 0 trains without the "
                        "teacher (default: the recipe's, 0.5)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_threads_flag(p)
    p.set_defaults(func=cmd_distill)
