"""Hugging Face tokenizer files: tokenizer.json (+ tokenizer_config.json), read and written.

tokenizer.json describes the whole pipeline: normalizer, pre-tokenizer, model (vocab and
merges), post-processor (which adds BOS/EOS), decoder and added tokens. We accept what
byte-level BPE models use (Llama 3, Qwen2, SmolLM2, GPT-2, ...) and reject anything else
with a `TokenizerError` naming the part: running a pipeline we only partly understand
would give silently different ids.

tokenizer_config.json is transformers' file: the BOS/EOS/PAD token names, whether to add
BOS/EOS, and the chat template (newer transformers writes the template to
chat_template.jinja instead; both are read). GPT-2's original vocab.json + merges.txt
are read here too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.tokenizer.added import AddedToken
from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.normalize import Normalizer
from lmforge.tokenizer.pretokenize import PIPELINES, PreTokenizer
from lmforge.tokenizer.spec import TokenizerSpec

logger = logging.getLogger(__name__)

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
MAX_TOKEN_ID = 2**24 - 1  # the largest real vocabularies hold ~1M tokens; ids size lookup tables


# --------------------------------------------------------------------------- reading


def _load_json(path: Path) -> Any:
    """A JSON file bounded in size and nesting depth (`lmforge.formats.strictjson`).

    NaN/Infinity (which Python's json writes) are let through: no tokenizer number feeds
    arithmetic unchecked, so refusing them would only refuse files that load elsewhere.
    """
    if not path.exists():
        raise TokenizerError(f"{path}: file not found")
    try:
        return read_json(path, allow_nonfinite=True)
    except JSONInputError as err:
        raise TokenizerError(f"{path}: not a readable JSON file ({err.reason})") from err


def read_tokenizer_json(path: str | Path) -> TokenizerSpec:
    """Read tokenizer.json, and tokenizer_config.json / chat_template.jinja beside it.

    The file is input: its parts are type-checked where they are read, and a value of
    the wrong type anywhere else (a list where a section belongs, say) is still one
    `TokenizerError` naming the file, never a traceback from inside the pipeline classes.
    """
    path = Path(path)
    obj = _load_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)")
    for section in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if obj.get(section) is not None and not isinstance(obj[section], dict):
            raise TokenizerError(f"{path}: {section} must be an object, got {obj[section]!r:.80}")
    try:
        return _spec_from_json(obj, path)
    except TokenizerError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as err:
        raise TokenizerError(f"{path}: malformed tokenizer.json ({type(err).__name__}: {err})") from err


def _spec_from_json(obj: dict[str, Any], path: Path) -> TokenizerSpec:
    model = obj["model"]
    vocab, merges, options = _read_bpe_model(model, path)
    added = _added_tokens(obj.get("added_tokens") or [], vocab, path)
    normalizer = Normalizer.from_hf(obj.get("normalizer"))
    pretokenizer = PreTokenizer.from_hf(obj.get("pre_tokenizer"))
    _check_decoder(obj.get("decoder"), path)
    prefix, suffix = _post_processor_ends(obj.get("post_processor"), path)

    def id_of(content: str | None) -> int | None:
        if content is None:
            return None
        found = next((t.id for t in added if t.content == content), vocab.get(content))
        if found is None:
            raise TokenizerError(
                f"{path}: special token {content!r} is neither an added token nor in the vocabulary"
            )
        return found

    config = _read_config(path.parent)
    bos = (
        id_of(_token_name(config.get("bos_token")))
        if config.get("bos_token")
        else (prefix[0] if prefix else None)
    )
    eos = (
        id_of(_token_name(config.get("eos_token")))
        if config.get("eos_token")
        else (suffix[0] if suffix else None)
    )
    pad = id_of(_token_name(config.get("pad_token"))) if config.get("pad_token") else None
    specials = [t for t in added if t.special]
    if bos is None and eos is None and not config and len(specials) == 1:
        bos = eos = specials[0].id  # GPT-2's convention: its one special token both starts and ends text
    add_bos = bool(config.get("add_bos_token", bool(prefix)))
    add_eos = bool(config.get("add_eos_token", bool(suffix)))
    if prefix and prefix != [bos] or suffix and suffix != [eos]:
        raise TokenizerError(
            f"{path}: post-processor adds {prefix} before and {suffix} after the text, which is "
            "not the tokenizer's BOS/EOS; lmforge supports only a BOS prefix and an EOS suffix"
        )
    return TokenizerSpec(
        vocab=vocab,
        merges=merges,
        pretokenizer=pretokenizer,
        added_tokens=added,
        normalizer=normalizer,
        ignore_merges=options["ignore_merges"],
        unk_token=options["unk_token"],
        fuse_unk=options["fuse_unk"],
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(config, path.parent),
        gguf_pre=pretokenizer.name,
    )


def _added_tokens(entries: list[dict[str, Any]], vocab: dict[str, int], path: Path) -> list[AddedToken]:
    """Added tokens with the ids HF gives them: a token already in the vocabulary keeps its
    vocabulary id; any other gets the next id after the vocabulary, in file order. The
    ids written in the file are only checked (they agree in every sane file)."""
    tokens: dict[str, AddedToken] = {}
    next_id = len(vocab)
    if not isinstance(entries, list):
        raise TokenizerError(f"{path}: added_tokens must be a list")
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and _is_id(entry.get("id"))):
            raise TokenizerError(f"{path}: added token {entry!r:.80} needs a string 'content' and an 'id'")
        token = AddedToken.from_hf(entry)
        if token.content in tokens:
            continue
        if token.content in vocab:
            token_id = vocab[token.content]
        else:
            token_id, next_id = next_id, next_id + 1
        if token_id != token.id:
            logger.warning(
                "%s: added token %r has id %d in the file, but HF gives it %d; using %d",
                path,
                token.content,
                token.id,
                token_id,
                token_id,
            )
        tokens[token.content] = dataclasses.replace(token, id=token_id)
    return list(tokens.values())


def _read_bpe_model(
    model: dict[str, Any], path: Path
) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, Any]]:
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        wordpiece = (" (a BERT WordPiece vocabulary: sentence encoders read it with "
                     "lmforge.tokenizer.wordpiece, e.g. `lmforge rag index --embedder FOLDER`)"
                     if kind == "WordPiece" else "")
        raise TokenizerError(
            f"{path}: tokenizer model {kind!r} is not supported here; a generating model's tokenizer is "
            f"byte-level BPE (Unigram and WordLevel models are not implemented){wordpiece}"
        )
    if model.get("dropout") not in (None, 0, 0.0):
        raise TokenizerError(
            f"{path}: BPE dropout {model['dropout']} is not supported (it makes encoding random)"
        )
    if model.get("byte_fallback"):
        raise TokenizerError(
            f"{path}: BPE byte_fallback (SentencePiece-style <0xNN> tokens) is not supported"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(
                f"{path}: BPE {key}={model[key]!r} is not supported (byte-level BPE has none)"
            )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: BPE model has no vocab")
    bad = next((k for k, v in vocab.items() if not _is_id(v)), None)
    if bad is not None:
        raise TokenizerError(f"{path}: vocab entry {bad!r} has id {vocab[bad]!r}, not an integer "
                             f"in 0..{MAX_TOKEN_ID}")
    if len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        for token, token_id in vocab.items():
            if token_id in seen:
                raise TokenizerError(f"{path}: vocab gives id {token_id} to both {seen[token_id]!r} "
                                     f"and {token!r}")
            seen[token_id] = token
    if not isinstance(model.get("merges") or [], list):
        raise TokenizerError(f"{path}: BPE merges must be a list")
    merges = [_merge_pair(m, path) for m in model.get("merges") or []]
    options = {
        "ignore_merges": bool(model.get("ignore_merges", False)),
        "unk_token": model.get("unk_token"),
        "fuse_unk": bool(model.get("fuse_unk", False)),
    }
    return {str(k): int(v) for k, v in vocab.items()}, merges, options


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _merge_pair(merge: Any, path: Path) -> tuple[str, str]:
    parts = merge.split(" ") if isinstance(merge, str) else merge if isinstance(merge, list) else []
    if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise TokenizerError(f"{path}: merge {merge!r} is not a pair of tokens")
    return parts[0], parts[1]


def _check_decoder(decoder: dict[str, Any] | None, path: Path) -> None:
    kinds = (
        [d.get("type") for d in decoder.get("decoders", [])]
        if decoder and decoder.get("type") == "Sequence"
        else [decoder.get("type") if decoder else None]
    )
    if kinds != ["ByteLevel"]:
        raise TokenizerError(
            f"{path}: decoder {kinds} is not supported; a byte-level BPE decodes with ByteLevel"
        )


def _post_processor_ends(post: dict[str, Any] | None, path: Path) -> tuple[list[int], list[int]]:
    """Token ids the post-processor puts before and after a single text."""
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for sub in post.get("processors", []):
            p, s = _post_processor_ends(sub, path)
            prefix, suffix = prefix + p, s + suffix
        return prefix, suffix
    if kind == "TemplateProcessing":
        specials = post.get("special_tokens", {})
        before: list[int] = []
        after: list[int] = []
        seen_text = False
        for item in post.get("single", []):
            if "Sequence" in item:
                seen_text = True
                continue
            name = item.get("SpecialToken", {}).get("id")
            if name not in specials:
                raise TokenizerError(f"{path}: post-processor refers to unknown special token {name!r}")
            (after if seen_text else before).extend(int(i) for i in specials[name]["ids"])
        return before, after
    raise TokenizerError(
        f"{path}: post-processor {kind!r} is not supported "
        "(lmforge supports ByteLevel and TemplateProcessing)"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):  # the second wins, as in transformers
        if (folder / name).is_file():
            found = _load_json(folder / name)
            if isinstance(found, dict):
                config.update(found)
    return config


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.json").is_file():
        template = _load_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_vocab_merges(vocab_path: str | Path, merges_path: str | Path) -> TokenizerSpec:
    """GPT-2's original files: encoder.json / vocab.json (token -> id) and vocab.bpe / merges.txt."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    vocab = _load_json(vocab_path)
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{vocab_path}: expected a JSON object mapping tokens to ids")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise TokenizerError(f"{merges_path}: file not found") from err
    merges = [_merge_pair(line, merges_path) for line in lines if line and not line.startswith("#version")]
    added = [AddedToken(int(vocab[t]), t, special=True) for t in ("<|endoftext|>",) if t in vocab]
    eos = added[0].id if added else None
    return TokenizerSpec(
        vocab={str(k): int(v) for k, v in vocab.items()},
        merges=merges,
        pretokenizer=PIPELINES["gpt-2"],
        added_tokens=added,
        bos_token_id=eos,
        eos_token_id=eos,
        gguf_pre="gpt-2",
    )


# --------------------------------------------------------------------------- writing


def tokenizer_json(spec: TokenizerSpec) -> dict[str, Any]:
    """The spec as a tokenizer.json object that HF `tokenizers` loads."""
    def token(token_id: int) -> dict[str, Any]:
        return {"id": spec.token_string(token_id), "type_id": 0}

    before = [spec.bos_token_id] if spec.add_bos and spec.bos_token_id is not None else []
    after = [spec.eos_token_id] if spec.add_eos and spec.eos_token_id is not None else []
    single = (
        [{"SpecialToken": token(i)} for i in before]
        + [{"Sequence": {"id": "A", "type_id": 0}}]
        + [{"SpecialToken": token(i)} for i in after]
    )
    pair = (
        single
        + [{"SpecialToken": token(i) | {"type_id": 1}} for i in before]
        + [{"Sequence": {"id": "B", "type_id": 1}}]
        + [{"SpecialToken": token(i) | {"type_id": 1}} for i in after]
    )
    specials = {
        token(i)["id"]: {"id": token(i)["id"], "ids": [i], "tokens": [token(i)["id"]]} for i in before + after
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [t.to_hf() for t in sorted(spec.added_tokens, key=lambda t: t.id)],
        "normalizer": spec.normalizer.to_hf() if spec.normalizer else None,
        "pre_tokenizer": spec.pretokenizer.to_hf(),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": specials,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": spec.unk_token,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": spec.fuse_unk,
            "byte_fallback": False,
            "ignore_merges": spec.ignore_merges,
            "vocab": dict(sorted(spec.vocab.items(), key=lambda item: item[1])),
            "merges": [f"{a} {b}" if " " not in a + b else [a, b] for a, b in spec.merges],
        },
    }


def tokenizer_config(spec: TokenizerSpec) -> dict[str, Any]:
    """transformers' tokenizer_config.json: special token names, BOS/EOS flags, chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.token_string(spec.bos_token_id),
        "eos_token": spec.token_string(spec.eos_token_id),
        "pad_token": spec.token_string(spec.pad_token_id),
        "unk_token": spec.unk_token,
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(t.id): {k: v for k, v in t.to_hf().items() if k != "id"}
            for t in sorted(spec.added_tokens, key=lambda t: t.id)
        },
    }
    if spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
    return config


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` atomically (`lmforge.atomic.atomic_write`)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def save(spec: TokenizerSpec, folder: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `folder`, each atomically.

    transformers prefers chat_template.jinja to the config's template, so if the folder
    has one it is rewritten (or removed) to match.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "tokenizer.json", tokenizer_json(spec))
    write_json_atomic(folder / CONFIG_FILE, tokenizer_config(spec))
    template_file = folder / TEMPLATE_FILE
    if template_file.exists():
        if spec.chat_template is None:
            template_file.unlink()
        else:
            with atomic_write(template_file, "w") as f:
                f.write(spec.chat_template)
