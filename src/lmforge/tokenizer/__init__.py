"""Byte-level BPE tokenizers: load, run and save GPT-2, SmolLM2, Llama 3, Qwen2, tiktoken ones.

    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a folder / tokenizer.json
    ids = tok.encode("Hello world")
    tok.decode(ids)

Modules, in pipeline order: `added` (special tokens), `normalize`, `pretokenize` (regexes),
`bytelevel` (bytes as characters), `bpe` (reference encoder), `ranks` + `fast` (tiktoken),
`chat` (templates); `hf_json` and `gguf_meta` read and write the file formats, `spec`
holds a tokenizer as data, and `tokenizer` puts it together. `train` learns new merges.
"""

from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]
