"""Does retrieval help a small model answer? SmolLM2-135M-Instruct on HotpotQA dev, EM and F1, three ways.

closed book (the question alone), retrieved (`lmforge rag ask`'s prompt over the top-k
passages that all-MiniLM-L6-v2 + BM25 (hybrid) find in HotpotQA's pooled corpus), and the
two gold paragraphs (`lmforge eval --task hotpotqa`'s prompt: what a perfect retriever
would give). Same questions (a seeded sample), same greedy decoding, same scoring
(lmforge.rag.answer_quality).

The corpus index is the one `lmforge rag eval --task hotpotqa` and bench_retrieval.py build
in the lmforge cache (embedding 66,581 paragraphs takes a while on a laptop CPU: build it
once with `python benchmarks/bench_retrieval.py --stage build --task hotpotqa`). An
index still being built holds fewer paragraphs: the table says how many, and
`--only-indexed` draws the questions among those whose gold paragraphs it holds (the
search then covers a smaller pool than the whole corpus, but one holding every such
question's own eight distractors, chosen by HotpotQA to resemble it).

    python benchmarks/bench_rag_answers.py --questions 200 --json rag-answers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import announce  # noqa: E402

from lmforge.rag.answer import AnswerConfig  # noqa: E402
from lmforge.rag.answer_quality import SETTINGS, hotpotqa_answer_quality  # noqa: E402

ANCHORS: tuple[str, ...] = ()  # the anchor is the same model without retrieval, and with the gold paragraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4, help="passages retrieved per question")
    parser.add_argument("--mode", default="hybrid", choices=["dense", "bm25", "hybrid"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hint", default="short", choices=["short", "yesno"],
                        help="the instruction after each question (see lmforge.rag.answer_quality)")
    parser.add_argument("--only-indexed", action="store_true",
                        help="draw only questions whose gold paragraphs the index holds (a partial index)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results, every reply too")
    args = parser.parse_args()
    announce()

    from lmforge.infer.engine import Engine
    from lmforge.rag.embed import load_embedder
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.tasks import task_index_dir

    embedder = load_embedder("minilm")
    folder = task_index_dir("hotpotqa", embedder.name)
    if not (folder / "manifest.json").exists():
        sys.exit(f"no HotpotQA index at {folder}: build it first (python benchmarks/bench_retrieval.py "
                 "--stage build --task hotpotqa)")
    index = RagIndex.open(folder)
    print(f"index: {folder} ({len(index.chunks):,} of HotpotQA's 66,581 paragraphs)", flush=True)
    retriever = Retriever(index, embedder)
    engine = Engine.from_pretrained("smollm2")
    config = AnswerConfig(k=args.k, mode=args.mode, max_tokens=args.max_tokens)
    result = hotpotqa_answer_quality(retriever, engine, limit=args.questions, seed=args.seed, config=config,
                                     only_indexed=args.only_indexed, hint=args.hint,
                                     say=lambda text: print(text, file=sys.stderr, flush=True))
    drawn = " whose gold paragraphs the index holds" if args.only_indexed else ""
    print(f"\nSmolLM2-135M-Instruct, {result['questions']} HotpotQA dev questions{drawn} (seed {args.seed}), "
          f"retrieval {args.mode} k={args.k} over {len(index.chunks):,} paragraphs, hint {args.hint!r}; "
          f"{result['abstained']} answered \"I don't know\" by the relevance guard\n")
    print("| setting | EM | F1 | seconds |\n|---|---|---|---|")
    for setting in SETTINGS:
        row, name = result[setting], setting.replace("_", " ")
        print(f"| {name} | {row['exact_match']:.3f} | {row['f1']:.3f} | {row['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
