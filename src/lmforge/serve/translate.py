"""OpenAI request fields -> what the engine takes: prompt token ids and `SamplingParams`.

Everything a request can get wrong beyond the schema's types and ranges is found here,
before the request reaches the engine: features lmforge does not implement, a prompt
that with the requested reply does not fit the model's context (the message names both
numbers, as OpenAI's does), sampling parameters the engine refuses.

The reply's length: an explicit `max_tokens` is a promise the server keeps or refuses, so
a prompt plus `max_tokens` beyond the context is a 400 (vLLM does the same); without one,
the default (chat: the rest of the context; legacy completions: 16 tokens) is cut to the
room the prompt leaves.

Message text is encoded as text: special-token text in a message becomes ordinary
tokens, and only the chat template's own markers are control tokens
(`Tokenizer.encode_chat_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.infer.sampling import SamplingError, SamplingParams
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingRequest
from lmforge.tokenizer import Tokenizer, TokenizerError

#: Legacy completions stop after 16 tokens when max_tokens is not given (OpenAI's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def refuse_unsupported(req: SamplingRequest) -> None:
    """Known OpenAI features lmforge does not implement: refuse them rather than ignore them."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", param="logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise bad_request("tools (function calling) are not supported by this server", param="tools")
        if req.functions:
            raise bad_request("functions (function calling) are not supported by this server",
                              param="functions")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request('only response_format {"type": "text"} is supported', param="response_format")
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo is not supported by this server", param="echo")
        if req.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of must equal n ({req.n}): choosing among extra samples is not "
                              "supported", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[ChatMessage], *,
                    add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered with the model's chat template, as token ids.

    Like Hugging Face's `apply_chat_template(tokenize=True)`, no BOS is added on top of
    the rendered text (templates that want one write it themselves); unlike it, text in
    the messages never becomes a special token."""
    conversation = [m.as_template_input() for m in messages]
    try:
        return tokenizer.encode_chat_prompt(conversation, add_generation_prompt=add_generation_prompt)
    except TokenizerError as err:
        raise bad_request(str(err), param="messages") from err


def text_prompt_ids(tokenizer: Tokenizer, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
    if add_special_tokens:
        return tokenizer.encode(prompt)
    return tokenizer.encode(prompt, add_bos=False, add_eos=False)


def fit_reply(prompt_tokens: int, requested: int | None, max_model_len: int, *, param: str,
              default: int | None = None) -> int | None:
    """The reply's `max_tokens` for the engine (None: until the context is full).

    An explicit `requested` must fit beside the prompt (else a 400 naming both numbers);
    without one, `default` is cut to the room the prompt leaves."""
    if requested is None and default is not None:
        requested = max(min(default, max_model_len - prompt_tokens), 1)
    check_context(prompt_tokens, requested, max_model_len, param=param)
    return requested


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int, *, param: str) -> None:
    """Refuse a prompt that, with `max_tokens` new tokens (at least one), does not fit."""
    if prompt_tokens == 0:
        raise bad_request("the prompt is empty", param=param)
    wanted = max_tokens or 1
    if prompt_tokens + wanted > max_model_len:
        asked = f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {param}, {wanted} for the reply)"
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but you "
                            f"requested {asked}. Shorten the {param} or lower max_tokens.",
                       param=param, code="context_length_exceeded")


def sampling_params(req: SamplingRequest, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                    choice: int = 0) -> SamplingParams:
    """The engine's parameters for one choice. With a seed, choice i uses seed + i, so the n
    replies of a seeded request differ from each other and each is reproducible."""
    seed = None if req.seed is None else (req.seed + choice) % 2**64
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed,
            max_tokens=max_tokens,
            stop=req.stop_strings(),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
    except SamplingError as err:
        raise bad_request(str(err)) from err


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """`max_completion_tokens` (the newer name) wins over `max_tokens`; None: until the context is full."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def completion_max_tokens(req: CompletionRequest) -> int | None:
    """The requested `max_tokens`, or None (then `COMPLETIONS_DEFAULT_MAX_TOKENS`, cut to fit)."""
    return req.max_tokens


def completion_prompt_ids(tokenizer: Tokenizer, req: CompletionRequest, vocab_size: int) -> list[list[int]]:
    """Each prompt of a legacy completions request as token ids (text is encoded, ids checked)."""
    prompts = []
    for i, prompt in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = text_prompt_ids(tokenizer, prompt)
        else:
            ids = list(prompt)
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the model's vocabulary (0..{vocab_size - 1})",
                                  param=param)
        prompts.append(ids)
    return prompts
