"""Decoding speed: lmforge's Engine vs transformers' `generate` and llama.cpp, on one CPU.

Measured in one run, on SmolLM2-135M-Instruct (real weights, from the packaged GGUF)
and on the GPT-2 124M configuration (random weights; the speed does not depend on them):

1. **Batch-1 greedy decode**, tokens/s, prefill excluded, at matching precision:
   lmforge fp32 / int8 (per channel) / int4 (groups of 32, 5 bits like Q4_1) against
   transformers fp32 and llama.cpp F32 / Q8_0 / Q4_1 (llama-cpp-python's C API,
   `llama_decode` per token, greedy with numpy, same thread count). Both timings cover
   the decode loop only; lmforge's includes everything its engine does per token.
2. **Fraction of the bandwidth bound**: a decode step must read every weight once, so
   tokens/s can be at most (memory bandwidth) / (weight bytes per token). The bandwidth is
   measured here with a streaming C read loop on all threads over 512 MB (`lmforge.infer.
   kernels.read_bandwidth`, best of 5, in every round) and printed, beside `torch.sum`'s
   rate, which does more than load and so understated the machine (llama.cpp's F32 ran above
   a `torch.sum` bound).
   All contenders run once per round, rounds interleaved, best round kept: this machine's
   bandwidth drifts by +-15% over minutes (other tenants), and so each sees the same drift.
3. **16 concurrent requests**: the engine with continuous batching vs transformers'
   batched `generate` (all 16 prompts left-padded into one call, attention mask, greedy),
   both given all requests at once, both warmed up on the same batch, exactly
   `--concurrent-tokens` new tokens per request on both sides (lmforge `ignore_eos`,
   transformers `min_new_tokens`), only real generated tokens counted (not padding),
   total tokens / wall time with prefills included, rounds interleaved, best round kept.
   The greedy outputs are compared token by token. transformers serving the requests one
   at a time is an extra row (`--skip-hf-sequential` leaves it out).
4. **Speculative decoding**: SmolLM2 fp32 with its own int8 / int4 versions as the draft,
   vs plain fp32 decoding, on a chat reply: tokens/s (prefill included, best of the
   rounds), acceptance rate, speed-up, and whether the tokens are identical (greedy).

    python benchmarks/bench_decode.py                      # everything (about 10 minutes)
    python benchmarks/bench_decode.py --only smollm2 --skip-llamacpp --tokens 64
    python benchmarks/bench_decode.py --only concurrent --concurrent 4 --concurrent-tokens 8 \
        --concurrent-rounds 1 --skip-hf-sequential                             # smoke
    python benchmarks/bench_decode.py --json results.json

Run it on an otherwise idle machine: every number is a best-of-N, but a busy CPU still
lowers them all.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anchors import require
from machine import announce

from lmforge.formats.gguf import GGUFFile
from lmforge.infer.engine import Engine
from lmforge.infer.loading import load_model
from lmforge.infer.quant import quantize_model, weight_bytes
from lmforge.infer.sampling import SamplingParams
from lmforge.model.gguf import export_gguf, load_gguf_model

#: what lmforge is run against (benchmarks/anchors.py): transformers, gguf (GPT-2 GGUFs for
#: llama.cpp; transformers' GGUF loader, which also wants accelerate) and llama.cpp's binding
ANCHORS = ("transformers", "gguf", "accelerate", "llama_cpp")
PROMPT = "The history of the printing press begins"
CHAT_PROMPT = "Explain in a few sentences why the sky is blue."


# ----------------------------------------------------------------------------------- machine
def memory_bandwidth(repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: lmforge's streaming C read loop over 512 MB (far larger than any
    cache), best of `repeats`; `torch_sum_bandwidth` where the kernels cannot be built."""
    from lmforge.infer import kernels

    if kernels.available():
        return kernels.read_bandwidth(512 << 20, repeats)
    return torch_sum_bandwidth(repeats)


def torch_sum_bandwidth(repeats: int = 10) -> float:
    """Bytes/s `torch.sum` reads 512 MB at, best of `repeats` (the bound this benchmark once used)."""
    data = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


# ----------------------------------------------------------------------------------- lmforge
def lmforge_decoder(model, prompt_ids: list[int], tokens: int) -> Callable[[], float]:
    """A function measuring batch-1 greedy decode tokens/s (prefill excluded) once."""
    engine = Engine(model, max_batch_size=1)
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    engine.complete([prompt_ids], SamplingParams(temperature=0, max_tokens=4))  # warm-up (builds kernels)
    return lambda: engine.complete([prompt_ids], params)[0].stats.decode_tokens_per_second


# ------------------------------------------------------------------------------ transformers
def hf_decode(model, prompt_ids: list[int], tokens: int, repeats: int) -> float:
    """transformers `generate`, greedy: (time for 1 + tokens new tokens) - (time for 1)."""
    ids = torch.tensor([prompt_ids])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    run(2)  # warm-up
    first = min(run(1) for _ in range(repeats))
    full = min(run(tokens + 1) for _ in range(repeats))
    return tokens / (full - first)


# --------------------------------------------------------------------------------- llama.cpp
def llamacpp_decoder(path: Path, prompt_ids: list[int], tokens: int, threads: int) -> Callable[[], float]:
    """A function measuring llama.cpp greedy decode tokens/s once, through its C API (`llama_decode`
    one token at a time, argmax in numpy)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          verbose=False)
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()

    def decode(ids: list[int]) -> np.ndarray:
        array = (llama_cpp.llama_token * len(ids))(*ids)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def measure() -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        logits = decode(prompt_ids)  # prefill, not timed
        start = time.perf_counter()
        for _ in range(tokens):
            logits = decode([int(np.argmax(logits))])
        return tokens / (time.perf_counter() - start)

    measure.llm = llm  # keep the model alive with the closure
    return measure


def gpt2_gguf(model, path: Path, kind: str) -> Path:
    """A llama.cpp GPT-2 GGUF of an lmforge GPT-2 model (F32, Q8_0 or Q4_1 matrices)."""
    import gguf

    vocab = Path.home() / ".cache/lmforge/test-data/llama-vocab/ggml-vocab-gpt-2.gguf"
    if not vocab.exists():
        raise FileNotFoundError(f"{vocab}: GPT-2's llama.cpp vocabulary (from the llama-cpp-python sdist)")
    meta = GGUFFile(vocab).metadata
    cfg = model.config
    types = gguf.GGMLQuantizationType
    qtype = {"f32": None, "q8_0": types.Q8_0, "q4_1": types.Q4_1}[kind]
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(cfg.norm_eps)
    writer.add_file_type({"f32": 0, "q8_0": 7, "q4_1": 3}[kind])
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta.get("tokenizer.ggml.pre", "gpt-2"))
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            add(meta[f"tokenizer.ggml.{key}_token_id"])

    def tensor(name: str, t: torch.Tensor) -> None:
        a = t.detach().float().numpy()
        if a.ndim == 2 and qtype is not None and name != "position_embd.weight":
            writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, a)

    sd = model.state_dict()
    tensor("token_embd.weight", sd["embed.weight"])
    tensor("position_embd.weight", sd["pos_embed.weight"])
    tensor("output.weight", sd["embed.weight"])  # tied: the head reads the whole matrix, as lmforge's does
    tensor("output_norm.weight", sd["final_norm.weight"])
    tensor("output_norm.bias", sd["final_norm.bias"])
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        qkv = [sd[p + f"attn.{n}_proj.weight"] for n in "qkv"]
        qkv_b = [sd[p + f"attn.{n}_proj.bias"] for n in "qkv"]
        for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
            tensor(f"blk.{i}.{theirs}.weight", sd[p + ours + ".weight"])
            tensor(f"blk.{i}.{theirs}.bias", sd[p + ours + ".bias"])
        tensor(f"blk.{i}.attn_qkv.weight", torch.cat(qkv))
        tensor(f"blk.{i}.attn_qkv.bias", torch.cat(qkv_b))
        for ours, theirs in (("attn.o_proj", "attn_output"), ("mlp.up_proj", "ffn_up"),
                             ("mlp.down_proj", "ffn_down")):
            tensor(f"blk.{i}.{theirs}.weight", sd[p + ours + ".weight"])
            tensor(f"blk.{i}.{theirs}.bias", sd[p + ours + ".bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------ models
def smollm2_setup(tmp: Path, want_llamacpp: bool):
    loaded = load_model("smollm2")
    path = loaded.path
    ggufs: dict[str, Path] = {}
    if want_llamacpp:
        config, state, metadata = load_gguf_model(path)
        tokenizer_meta = {k: v for k, v in GGUFFile(path).metadata.items() if k.startswith("tokenizer.")}
        for kind in ("f32", "q8_0"):
            ggufs[kind] = export_gguf(tmp / f"smollm2-{kind}.gguf", config, state, tokenizer_meta, dtype=kind)
        ggufs["q4_1"] = path  # the packaged file itself: Q4_1 matrices, Q8_0 embedding/head

    def hf():
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()

    ids = loaded.tokenizer.encode(PROMPT)
    return loaded.model, hf, ids, ggufs, loaded


def gpt2_setup(tmp: Path, want_llamacpp: bool):
    import transformers

    from lmforge.model.checkpoint import load_checkpoint

    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    reference.save_pretrained(tmp / "gpt2")
    model, _ = load_checkpoint(tmp / "gpt2")
    model.eval()
    ggufs = {kind: gpt2_gguf(model, tmp / f"gpt2-{kind}.gguf", kind) for kind in ("f32", "q8_0", "q4_1")} \
        if want_llamacpp else {}
    ids = list(range(464, 464 + 8))
    return model, lambda: reference, ids, ggufs, None


# --------------------------------------------------------------------------------- sections
def batch1(name: str, setup, args, tmp: Path) -> list[dict]:
    """Every contender measured once per round, rounds interleaved, best round kept: the machine's
    memory bandwidth drifts by +-15% over minutes here, and this way each sees the same drift.
    The bandwidth itself is measured in every round too, and the bound uses the best."""
    model, make_hf, ids, ggufs, _ = setup(tmp, not args.skip_llamacpp)
    variants: list[tuple[str, object]] = [
        ("fp32", model),
        ("int8", quantize_model(copy.deepcopy(model), "int8")),
        ("int4", quantize_model(copy.deepcopy(model), "int4")),
    ]
    if name == "smollm2":  # the packaged Q4_1 file keeps its embedding/head at 8 bits: mirror it too
        variants.append(("int4 (head int8)", quantize_model(copy.deepcopy(model), "int4", head="int8")))
    contenders: dict[tuple[str, str], Callable[[], float]] = {}
    for label, m in variants:
        contenders[("lmforge", label)] = lmforge_decoder(m, ids, args.tokens)
    for kind, path in ggufs.items():
        contenders[("llama.cpp", kind)] = llamacpp_decoder(path, ids, args.tokens, torch.get_num_threads())
    best = dict.fromkeys(contenders, 0.0)
    bandwidths = []
    for _ in range(args.repeats):
        bandwidths.append(memory_bandwidth(5))
        for key, measure in contenders.items():
            best[key] = max(best[key], measure())
    bandwidth = max(bandwidths)
    print(f"  memory bandwidth over the rounds: best {bandwidth / 1e9:.1f} GB/s, "
          f"median {statistics.median(bandwidths) / 1e9:.1f} GB/s", flush=True)

    rows = []
    lm_fp32 = best[("lmforge", "fp32")]
    for (engine, label), tps in best.items():
        row = {"model": name, "engine": engine, "precision": label, "tokens_per_s": tps}
        if engine == "lmforge":
            m = dict(variants)[label]
            nbytes = weight_bytes(m)
            bound = bandwidth / nbytes
            row |= {"weight_bytes": nbytes, "bound_tokens_per_s": bound, "fraction_of_bound": tps / bound}
            print(f"  lmforge {label:<17} {tps:7.1f} tok/s   {nbytes / 1e6:6.1f} MB/token   "
                  f"bound {bound:6.1f} tok/s   {100 * tps / bound:5.1f}% of bound", flush=True)
        else:
            size = ggufs[label].stat().st_size
            row["file_bytes"] = size
            print(f"  llama.cpp {label:<15} {tps:7.1f} tok/s   ({size / 1e6:.0f} MB file)", flush=True)
        rows.append(row)
    if not args.skip_hf:
        hf = make_hf()
        tps = hf_decode(hf, ids, args.tokens, args.repeats)
        rows.append({"model": name, "engine": "transformers", "precision": "fp32", "tokens_per_s": tps})
        print(f"  transformers fp32        {tps:7.1f} tok/s   lmforge fp32 is {lm_fp32 / tps:.2f}x",
              flush=True)
        del hf
    return rows


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of prompts of different lengths, padded on the left (so every row's last
    prompt token sits in the last column, where generation continues), and its attention mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def real_tokens(generated: list[int], eos_ids: set[int]) -> list[int]:
    """What a row of a batched `generate` really generated: up to and including its first EOS;
    after that transformers fills the row with padding until the longest row is done."""
    for i, token in enumerate(generated):
        if token in eos_ids:
            return generated[:i + 1]
    return generated


def hf_generate_batch(hf, prompts: list[list[int]], tokens: int, pad_id: int) -> list[list[int]]:
    """transformers' batched greedy `generate` over all `prompts` in one call, exactly `tokens`
    new tokens per request (EOS suppressed until then); each request's real generated tokens."""
    ids, mask = left_padded(prompts, pad_id)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, pad_token_id=pad_id)
    eos = hf.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return [real_tokens(row.tolist(), eos_ids) for row in out[:, ids.shape[1]:]]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def concurrent(args) -> list[dict]:
    """`--concurrent` requests at once: lmforge's engine (continuous batching; static and paged KV
    cache) vs transformers' batched, left-padded `generate` (SmolLM2, fp32). Every contender is
    warmed up on the same batch (4 tokens), then the rounds interleave and each keeps its best."""
    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    topics = ["the moon", "bread", "rivers", "chess", "volcanoes", "the violin", "bees", "glass", "trains",
              "tea", "snow", "maps", "clocks", "whales", "paper", "bridges"]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}]))
               for t in topics[:args.concurrent]]
    n = args.concurrent_tokens
    contenders: dict[str, Callable[[int], list[list[int]]]] = {}  # label -> (new tokens -> outputs)
    for cache in ("static", "paged"):
        engine = Engine(loaded.model, tok, max_batch_size=args.concurrent, cache=cache)
        contenders[f"lmforge Engine, continuous batching, {cache} cache"] = (
            lambda tokens, engine=engine: [r.token_ids for r in engine.complete(
                prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))])
    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(loaded.path.parent, gguf_file=loaded.path.name,
                                                               dtype=torch.float32).eval()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else loaded.stop_ids()[0]
        contenders[f"transformers `generate`, one left-padded batch of {len(prompts)}"] = (
            lambda tokens: hf_generate_batch(hf, prompts, tokens, pad_id))
    for label, run in contenders.items():
        start = time.perf_counter()
        run(4)  # warm-up: the same batch, 4 tokens each
        print(f"  warmed up: {label} ({time.perf_counter() - start:.1f}s)", flush=True)
    best: dict[str, tuple[float, int, float]] = {}  # label -> (tokens/s, tokens, seconds)
    outputs: dict[str, list[list[int]]] = {}
    for round_no in range(1, args.concurrent_rounds + 1):
        for label, run in contenders.items():
            start = time.perf_counter()
            outputs[label] = run(n)
            seconds = time.perf_counter() - start
            total = sum(map(len, outputs[label]))
            print(f"  round {round_no}/{args.concurrent_rounds}: {label}: {total / seconds:.1f} tok/s",
                  flush=True)
            if total / seconds > best.get(label, (0.0,))[0]:
                best[label] = (total / seconds, total, seconds)
    if hf is not None and not args.skip_hf_sequential:  # one request at a time: an extra row
        label = "transformers `generate`, one request at a time"
        hf_generate_batch(hf, prompts[:1], 4, pad_id)
        start = time.perf_counter()
        outputs[label] = [hf_generate_batch(hf, [p], n, pad_id)[0] for p in prompts]
        seconds = time.perf_counter() - start
        total = sum(map(len, outputs[label]))
        best[label] = (total / seconds, total, seconds)

    labels = list(best)
    baseline = next((label for label in labels if "left-padded batch" in label), None)
    reference = outputs[labels[0]]
    rows = []
    for label in labels:
        tps, total, seconds = best[label]
        if total != len(prompts) * n:
            raise SystemExit(f"{label}: {total} tokens generated, expected {len(prompts)} x {n}")
        same = sum(a == b for a, b in zip(outputs[label], reference))
        prefix = statistics.mean(common_prefix(a, b) for a, b in zip(outputs[label], reference))
        row = {"engine": label, "requests": len(prompts), "tokens": total, "seconds": seconds,
               "tokens_per_s": tps, "identical_to_first": same, "mean_common_prefix_with_first": prefix}
        if baseline is not None:
            row["vs_transformers_batched"] = tps / best[baseline][0]
        rows.append(row)
        ratio = f", {row['vs_transformers_batched']:.2f}x transformers batched" if baseline else ""
        print(f"  {label}: {total} tokens in {seconds:.2f}s = {tps:.1f} tok/s{ratio}; outputs identical to "
              f"the first row's for {same}/{len(prompts)} requests (common prefix {prefix:.1f} tokens on "
              "average)", flush=True)
    print("\n  | | tokens | seconds | tokens/s | vs transformers batched |\n  |---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['vs_transformers_batched']:.2f}x" if baseline else ""
        print(f"  | {row['engine']} | {row['tokens']} | {row['seconds']:.1f} | {row['tokens_per_s']:.1f} | "
              f"{ratio} |", flush=True)
    return rows


def speculative(args) -> list[dict]:
    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]))
    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    rows = []

    def run(engine: Engine) -> tuple[float, object]:
        best, result = 0.0, None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = engine.complete([prompt], params)[0]
            best = max(best, len(result.token_ids) / (time.perf_counter() - start))
        return best, result

    base, plain = run(Engine(loaded.model, tok, stop_ids=loaded.stop_ids()))
    print(f"  fp32 alone: {base:.1f} tok/s ({len(plain.token_ids)} tokens, prefill included)", flush=True)
    rows.append({"draft": None, "tokens_per_s": base})
    drafts = (("int8", "int8", True), ("int4", "int4", True), ("int4 (head int8)", "int4", "int8"))
    for label, mode, head in drafts:
        draft = quantize_model(copy.deepcopy(loaded.model), mode, head=head)
        for k in args.speculative_k:
            engine = Engine(loaded.model, tok, stop_ids=loaded.stop_ids(), draft_model=draft,
                            num_speculative=k)
            tps, result = run(engine)
            same = result.token_ids == plain.token_ids
            rate = result.stats.acceptance_rate
            rows.append({"draft": label, "k": k, "tokens_per_s": tps, "acceptance_rate": rate,
                         "speedup": tps / base, "identical_tokens": same})
            print(f"  draft {label}, k={k}: {tps:.1f} tok/s, acceptance {rate:.2f}, "
                  f"speed-up {tps / base:.2f}x, identical tokens: {same}", flush=True)
    return rows


def anchors_needed(sections: list[str], args) -> list[str]:
    """The anchors the chosen parts import: transformers (GPT-2's weights are made with it, and it
    is a contender), gguf (GPT-2 GGUFs for llama.cpp) and gguf + accelerate (transformers loads
    SmolLM2 from its GGUF), llama-cpp-python."""
    needed = set()
    batch1 = {"smollm2", "gpt2"} & set(sections)
    if "gpt2" in sections:
        needed.add("transformers")
    if batch1 and not args.skip_llamacpp:
        needed |= {"llama_cpp", "gguf"}
    if not args.skip_hf and ({"smollm2", "concurrent"} & set(sections)):
        needed |= {"transformers", "gguf", "accelerate"}
    return sorted(needed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best round counts")
    parser.add_argument("--only", choices=["smollm2", "gpt2", "concurrent", "speculative"], action="append")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--concurrent-tokens", type=int, default=64)
    parser.add_argument("--concurrent-rounds", type=int, default=3,
                        help="interleaved rounds of the concurrent part; the best round counts")
    parser.add_argument("--skip-hf-sequential", action="store_true",
                        help="leave out transformers serving the concurrent requests one at a time")
    parser.add_argument("--speculative-k", type=int, nargs="+", default=[3, 4, 6])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sections = args.only or ["smollm2", "gpt2", "concurrent", "speculative"]
    require(*anchors_needed(sections, args),
            skip_hint="leave their rows out with --skip-hf / --skip-llamacpp")
    torch.set_num_threads(args.threads)

    machine = announce(("transformers", "llama-cpp-python", "gguf"))
    bandwidth = statistics.median(memory_bandwidth() for _ in range(3))
    summed = statistics.median(torch_sum_bandwidth() for _ in range(3))
    print(f"measured memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (a C read loop over 512 MB on "
          f"{torch.get_num_threads()} threads; torch.sum reads it at {summed / 1e9:.1f} GB/s)\n", flush=True)
    results: dict = {"machine": machine, "threads": args.threads, "bandwidth_bytes_per_s": bandwidth,
                     "torch_sum_bytes_per_s": summed,
                     "tokens": args.tokens, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, setup in (("smollm2", smollm2_setup), ("gpt2", gpt2_setup)):
            if name in sections:
                print(f"{name}: batch-1 greedy decode, {args.tokens} tokens, prefill excluded", flush=True)
                results[name] = batch1(name, setup, args, Path(tmp))
                print()
    if "concurrent" in sections:
        print(f"{args.concurrent} concurrent requests, {args.concurrent_tokens} tokens each (SmolLM2 fp32)")
        results["concurrent"] = concurrent(args)
        print()
    if "speculative" in sections:
        print(f"speculative decoding, SmolLM2 fp32 target, {args.tokens} tokens, greedy")
        results["speculative"] = speculative(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
