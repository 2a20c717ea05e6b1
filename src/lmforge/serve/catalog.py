"""The models one server serves, by the id clients put in `"model"`.

Each model has its own engine worker (thread, KV cache, queue); several can be loaded at
once and a request picks one by id. Ids are what the operator named them
(`--model NAME=PATH`), a sample's short name (`smollm2`), or the checkpoint folder's
name (a `.gguf` file's name without the extension).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.infer.engine import Engine
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.scheduler import EngineWorker
from lmforge.tokenizer import Tokenizer

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


def model_id_for(spec: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); a path -> (its folder or file stem, path); a sample name -> itself."""
    if not Path(spec).expanduser().exists() and "=" in spec:
        name, path = spec.split("=", 1)
        if not _MODEL_ID.match(name):
            raise ValueError(f"--model {spec!r}: {name!r} is not a usable model id "
                             "(letters, digits, . _ - : / @ +)")
        return name, path
    path = Path(spec).expanduser()
    if not path.exists():
        return spec, spec  # a sample name such as smollm2
    resolved = path.resolve()
    return (resolved.stem if resolved.is_file() else resolved.name), spec


@dataclass
class ServedModel:
    id: str
    worker: EngineWorker

    @property
    def engine(self) -> Engine:
        return self.worker.engine

    @property
    def tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise bad_request(f"model {self.id!r} has no tokenizer: it cannot take text")
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size


class Catalog:
    """The generating models; `others` names the server's embedding models, which this refuses
    to generate with (with a pointer to /v1/embeddings)."""

    def __init__(self, engines: Mapping[str, Engine], *, max_queue: int, others: Sequence[str] = ()) -> None:
        if not engines and not others:
            raise ValueError("a server needs at least one model")
        for name in [*engines, *others]:
            if not _MODEL_ID.match(name):
                raise ValueError(f"{name!r} is not a usable model id (letters, digits, . _ - : / @ +)")
        self.models = {name: ServedModel(name, EngineWorker(name, engine, max_queue=max_queue))
                       for name, engine in engines.items()}
        self.others = list(others)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())

    @property
    def workers(self) -> dict[str, EngineWorker]:
        return {name: m.worker for name, m in self.models.items()}

    def get(self, model: str | None) -> ServedModel:
        """The model a request names; with one model served, naming it is optional."""
        if model is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise bad_request("this server holds only embedding models: use /v1/embeddings",
                                  param="model")
            raise bad_request(f"several models are served, name one in 'model': {', '.join(self.models)}",
                              param="model")
        if model in self.others:
            raise bad_request(f"{model!r} is an embedding model: it answers /v1/embeddings, not generation",
                              param="model")
        served = self.models.get(model)
        if served is None:
            raise APIError(404, f"the model {model!r} does not exist; this server has: "
                                f"{', '.join(self.models)}", param="model", code="model_not_found")
        return served
