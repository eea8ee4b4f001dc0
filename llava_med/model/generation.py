"""Request preparation, sampling, incremental detokenisation and single-request streaming generation.

The pieces (``prepare_prompt``, ``TokenSampler``, ``TextAssembler``, ``SequenceState``) are what every caller
uses: the CLI through :func:`generate_stream`, and the worker's batching engine step by step. Sampling settings
are :class:`llava_med.sampling.SamplingParams`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import BadRequestError, ContextOverflowError
from llava_med.model.builder import LoadedModel
from llava_med.images.decode import ImageLimits, load_image
from llava_med.images.dicom import DicomOptions
from llava_med.model.preprocess import normalize_aspect_mode, process_images
from llava_med.model.prompting import check_image_count, stop_holdback, tokenizer_image_token, truncate_at_stop
from llava_med.sampling import CHAT_DEFAULTS, GenerationOutput, SamplingParams

class TokenSampler:
    """Picks the next token from one row of logits: greedy, or temperature + top-p with a per-request seed.

    Sampling runs on the CPU in float32 with the request's own generator, so a seeded request draws the same
    tokens whether it runs alone or inside a batch.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, logits: torch.Tensor, argmax: int | None = None) -> int:
        """``argmax``: the row's argmax when the caller already computed it for a whole batch."""
        if self.params.greedy:
            return argmax if argmax is not None else int(torch.argmax(logits).item())
        scaled = logits.detach().float().cpu() / self.params.temperature
        probs = torch.softmax(scaled, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= self.params.top_p
            sorted_probs[drop] = 0.0
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=self.generator)
            return int(order[choice].item())
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


class TextAssembler:
    """Turns generated token ids into text incrementally, never splitting a multi-byte character, and stops at
    stop strings. ``text`` is what may be shown now: a tail that could still become a stop string is held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self._decoded = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._checked = 0  # length of ``_decoded`` already searched for stop strings
        self._longest_stop = max((len(x) for x in self.stop), default=0)
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string has been reached."""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self.token_ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._decoded += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        if self.stop:
            # Only text added since the last check (plus a stop string's length of overlap) can hold a new match.
            start = max(0, self._checked - self._longest_stop + 1)
            cut, hit = truncate_at_stop(self._decoded[start:], self.stop)
            if hit:
                self._decoded = self._decoded[:start] + cut
                self.stopped = True
            self._checked = len(self._decoded)
        return self.stopped

    @property
    def final_text(self) -> str:
        return self._decoded

    @property
    def text(self) -> str:
        if self.stopped or not self.stop:
            return self._decoded
        hold = stop_holdback(self._decoded, self.stop)
        return self._decoded[: len(self._decoded) - hold] if hold else self._decoded


@dataclass
class PreparedPrompt:
    """A request ready for the model: token ids with image sentinels and the images' pixel tensors."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    num_prompt_tokens: int
    room: int  # new tokens that fit in the context after the prompt

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def sequence_length(loaded: LoadedModel, input_ids: Sequence[int]) -> int:
    """Positions a tokenised prompt takes in the model: each image placeholder becomes its image's tokens."""
    return len(input_ids) + input_ids.count(IMAGE_TOKEN_INDEX) * (loaded.model.num_image_tokens - 1)


def prepare_prompt(
    loaded: LoadedModel,
    prompt: str,
    images: Sequence = (),
    *,
    image_mode: str | None = None,
    limits: ImageLimits | None = None,
    allow_url: bool = False,
    allow_path: bool = True,
    dicom: DicomOptions | None = None,
) -> PreparedPrompt:
    """Check and tokenise ``prompt``, decode and preprocess ``images``, and measure the room left in the context.

    Raises typed errors (image count mismatch, bad image, context overflow) with messages that name the cause.
    Servers pass ``allow_path=False`` so that image strings from requests are never read as local file names;
    ``dicom`` sets the window and frame of DICOM images.
    """
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestError("prompt must be a non-empty string")
    images = list(images or ())
    check_image_count(prompt, len(images))
    input_ids = tokenizer_image_token(prompt, loaded.tokenizer)
    per_image = loaded.model.num_image_tokens
    num_tokens = sequence_length(loaded, input_ids)
    context = loaded.context_len
    if num_tokens >= context:
        raise ContextOverflowError(
            f"the prompt is {num_tokens} tokens ({len(images)} image(s) x {per_image} tokens included) but the "
            f"model's context is {context} tokens; shorten the conversation or start a new one"
        )
    pixel_values = None
    if images:
        mode = normalize_aspect_mode(image_mode, loaded.image_aspect_ratio)
        pil_images = [load_image(src, limits=limits, allow_url=allow_url, allow_path=allow_path, dicom=dicom)
                      for src in images]
        pixel_values = process_images(pil_images, loaded.image_processor, mode)
    return PreparedPrompt(
        input_ids=input_ids,
        pixel_values=pixel_values,
        num_prompt_tokens=num_tokens,
        room=context - num_tokens,
    )


class SequenceState:
    """Decoding state of one request: samples its next token from a row of logits, assembles its text and
    decides when it ends. The single-request loop below and the worker's batching engine both drive it."""

    def __init__(self, prepared: PreparedPrompt, params: SamplingParams, tokenizer) -> None:
        self.prepared = prepared
        self.params = params
        self.sampler = TokenSampler(params)
        self.assembler = TextAssembler(tokenizer, params.stop)
        self.eos_id = tokenizer.eos_token_id
        self.limit = min(params.max_new_tokens, prepared.room)
        self.generated = 0
        self.finish_reason: str | None = None
        self.last_token: int | None = None

    def advance(self, logits: torch.Tensor, argmax: int | None = None) -> bool:
        """Sample one token from ``logits`` (``[V]``; ``argmax`` if the caller computed it for the whole batch);
        returns True while the request goes on."""
        token = self.sampler(logits, argmax)
        self.generated += 1
        self.last_token = token
        if token == self.eos_id and not self.params.ignore_eos:
            self.finish_reason = "stop"
        elif self.assembler.add(token):
            self.finish_reason = "stop"
        elif self.generated >= self.limit:
            self.finish_reason = "length"
        return self.finish_reason is None

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def update(self) -> GenerationOutput:
        """The state to stream now (the final text and token ids once finished)."""
        if self.finish_reason is None:
            return GenerationOutput(self.assembler.text, None, self.prepared.num_prompt_tokens, self.generated)
        return GenerationOutput(self.assembler.final_text, self.finish_reason, self.prepared.num_prompt_tokens,
                                self.generated, tuple(self.assembler.token_ids))


@torch.inference_mode()
def generate_stream(
    loaded: LoadedModel,
    prepared: PreparedPrompt,
    params: SamplingParams,
    *,
    is_cancelled: Callable[[], bool] | None = None,
) -> Iterator[GenerationOutput]:
    """Generate for one request, yielding an update per token; the last update has ``finish_reason`` set
    (``"stop"``: end of sequence or a stop string; ``"length"``: ``max_new_tokens`` or the context is full;
    ``"cancelled"``: ``is_cancelled()`` returned True).
    """
    from transformers import DynamicCache

    model = loaded.model
    features = [] if prepared.pixel_values is None else list(model.encode_images(prepared.pixel_values))
    embeds = model.embed_prompt(prepared.input_ids, features).unsqueeze(0)
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds, cache=cache, logits_to_keep=1)
    state = SequenceState(prepared, params, loaded.tokenizer)
    while True:
        if is_cancelled is not None and is_cancelled():
            state.cancel()
            break
        if not state.advance(out.logits[0, -1]):
            break
        yield state.update()
        out = model(input_ids=torch.tensor([[state.last_token]], device=model.device), cache=cache)
    yield state.update()


def generate(
    loaded: LoadedModel,
    prompt: str,
    images: Sequence = (),
    params: SamplingParams | None = None,
    *,
    image_mode: str | None = None,
) -> str:
    """Whole answer for one templated prompt (convenience for scripts and tests)."""
    params = params or CHAT_DEFAULTS
    prepared = prepare_prompt(loaded, prompt, images, image_mode=image_mode)
    text = ""
    for update in generate_stream(loaded, prepared, params):
        text = update.text
    return text
