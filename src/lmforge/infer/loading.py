"""Open a model for generation from whatever the user points at.

A checkpoint folder (Hugging Face layout, written by lmforge or by transformers), a
quantized folder (`lmforge quantize`: loaded into the engine's int8/int4 layers), a
`.gguf` file (llama.cpp's format, weights dequantized on load), or the short name of a
packaged sample such as `smollm2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.hub import resolve_model_path
from lmforge.infer.quantized_folder import is_quantized_folder, load_quantized
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: EOS plus the end-of-turn tokens chat templates use."""
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>"):
            if name in self.tokenizer.special_tokens:
                ids.add(self.tokenizer.special_tokens[name])
        return sorted(ids)


def load_model(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    path = resolve_model_path(str(spec))
    if path.is_file() and path.suffix == ".gguf":
        from lmforge.model.gguf import load_gguf_model

        config, state_dict, metadata = load_gguf_model(path)
        model = Transformer.from_state_dict(config, state_dict, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)  # already parsed: don't read the file twice
    elif path.is_dir() and is_quantized_folder(path):  # `lmforge quantize` output: int8/int4 layers as stored
        model = load_quantized(path, device=device)
        tokenizer = load_tokenizer(path)
    elif path.is_dir():
        from lmforge.model.checkpoint import load_checkpoint

        model, _config = load_checkpoint(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path)
    else:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, path=path)
