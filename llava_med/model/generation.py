"""Request preparation, sampling, incremental detokenisation and single-request streaming generation.

The pieces (``prepare_prompt``, ``TokenSampler`` and :func:`sample_tokens`, ``TextAssembler``, ``SequenceState``)
are what every caller uses: the CLI through :func:`generate_stream`, and the worker's batching engine step by step.
Sampling settings are :class:`llava_med.sampling.SamplingParams`.

Sampling runs on the device of the logits, for all rows of a batch at once, with a seeded generator per request:
a seeded request draws the same tokens alone or in a batch, and on a CPU the same tokens as the row-by-row
``torch.multinomial`` sampler this replaced. Batched and single runs agree exactly in fp32; in bf16 or fp16 the other
rows of a batch change kernel shapes and rounding, so a row may part from its single run after a few tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llava_med.errors import BadRequestError, LlavaMedError
from llava_med.model.builder import LoadedModel
from llava_med.images.decode import ImageLimits, load_image
from llava_med.images.dicom import DicomOptions
from llava_med.model.preprocess import normalize_aspect_mode, process_images
from llava_med.model.prompting import (
    check_fits_context,
    check_image_count,
    check_prompt_chars,
    prompt_positions,
    stop_holdback,
    tokenizer_image_token,
    truncate_at_stop,
)
from llava_med.sampling import CHAT_DEFAULTS, GenerationOutput, SamplingParams


class NonFiniteLogitsError(LlavaMedError):
    """The model's logits for a request hold NaN or infinity: it cannot go on."""

    def __init__(self, message: str = "the model produced non-finite logits (NaN or inf) for this request") -> None:
        super().__init__(message)


class TokenSampler:
    """The sampling state of one request: its settings and its own seeded generator.

    The generator is made on the device of the first logits it samples from (a request never changes device), so
    a seeded request draws the same tokens whether it runs alone or inside a batch. Calling the sampler on one row
    of logits returns that row's token (the CLI's single-request loop); batches go through :func:`sample_tokens`.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits ``[V]`` (copies it to the host: for single-request loops)."""
        token = int(sample_tokens(logits.reshape(1, -1), [self])[0])
        if token < 0:
            raise NonFiniteLogitsError()
        return token


class _RowGroup:
    """Rows of a batch that sample the same way, with their settings already on the logits' device."""

    def __init__(self, rows: list[int], samplers: Sequence[TokenSampler], device: torch.device, nucleus: bool) -> None:
        self.nucleus = nucleus
        # Rows as a slice when they are consecutive (the usual case: every row samples alike), else an index.
        if rows == list(range(rows[0], rows[-1] + 1)):
            self.select: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
        else:
            self.select = device_tensor(rows, device)
        params = [samplers[i].params for i in rows]
        self.temperature = device_tensor([p.temperature for p in params], device, torch.float32).unsqueeze(1)
        self.top_p = device_tensor([p.top_p for p in params], device, torch.float32).unsqueeze(1)
        self.generators = [samplers[i].generator(device) for i in rows]


class SamplingPlan:
    """How one batch composition samples: which rows are greedy, which sample from the whole distribution and which
    from a top-p nucleus, with their settings on the device. Built when rows join or leave, so that a decode step
    samples with device operations only (:func:`sample_tokens`)."""

    def __init__(self, samplers: Sequence[TokenSampler], device: torch.device | str) -> None:
        device = torch.device(device)
        self.device = device
        sampling = [i for i, s in enumerate(samplers) if not s.params.greedy]
        plain = [i for i in sampling if samplers[i].params.top_p >= 1.0]
        nucleus = [i for i in sampling if samplers[i].params.top_p < 1.0]
        self.groups = [_RowGroup(rows, samplers, device, is_nucleus)
                       for rows, is_nucleus in ((plain, False), (nucleus, True)) if rows]


def device_tensor(values: Sequence, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device`` without waiting for the device: from pinned memory, asynchronously,
    on CUDA (a plain ``torch.tensor(..., device="cuda")`` synchronises the stream)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def sample_tokens(logits: torch.Tensor, samplers: Sequence[TokenSampler],
                  plan: SamplingPlan | None = None) -> torch.Tensor:
    """The next token of every row of ``logits`` (``[B, V]``), as a ``[B]`` tensor on the logits' device; ``-1``
    for a row whose logits hold a NaN or ``+inf`` (or nothing but ``-inf``): such a row cannot be sampled.

    Greedy rows take the argmax. Sampling rows divide by their temperature, keep their top-p nucleus, and draw with
    their own generator exactly as ``torch.multinomial(probs, 1)`` does (``argmax(probs / q)`` with
    ``q ~ Exp(1)`` from the generator, in the same order), so a seed draws the same tokens as the row-by-row CPU
    sampler did. Nothing waits for the device: the caller copies the result to the host once.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # NaN counts as the largest value: a row with one has a NaN maximum
    usable = torch.isfinite(logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    plan = plan if plan is not None else SamplingPlan(samplers, logits.device)
    for group in plan.groups:
        probs = torch.softmax(logits[group.select] / group.temperature, dim=-1)
        if group.nucleus:
            probs, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill(torch.cumsum(probs, dim=-1) - probs >= group.top_p, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        noise = torch.empty_like(probs)
        for row, generator in zip(noise, group.generators, strict=True):
            row.exponential_(generator=generator)
        # An exact 0 (possible on CPU, about 2**-53 per draw) would divide into inf or nan.
        choice = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        if group.nucleus:
            choice = order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        tokens[group.select] = choice
    return torch.where(usable, tokens, -1)


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


def max_prompt_chars(loaded: LoadedModel) -> int:
    """Longest prompt, in characters, that can fit in the context: no token of the vocabulary is longer than its
    longest piece, so a longer prompt has more tokens than the context holds (computed once per model)."""
    limit = loaded.extra.get("max_prompt_chars")
    if limit is None:
        longest = max((len(piece) for piece in loaded.tokenizer.get_vocab()), default=16)
        limit = loaded.extra["max_prompt_chars"] = loaded.context_len * max(longest, 1)
    return limit


def sequence_length(loaded: LoadedModel, input_ids: Sequence[int]) -> int:
    """Positions a tokenised prompt takes in the model: each image placeholder becomes its image's tokens."""
    return prompt_positions(input_ids, loaded.model.num_image_tokens)


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
    check_prompt_chars(prompt, max_prompt_chars(loaded), loaded.context_len)
    images = list(images or ())
    check_image_count(prompt, len(images))
    input_ids = tokenizer_image_token(prompt, loaded.tokenizer)
    per_image = loaded.model.num_image_tokens
    num_tokens = sequence_length(loaded, input_ids)
    room = check_fits_context(num_tokens, len(images), per_image, loaded.context_len)
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
        room=room,
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

    def advance(self, logits: torch.Tensor) -> bool:
        """Sample one token from ``logits`` (``[V]``) and take it; returns True while the request goes on."""
        return self.accept(self.sampler(logits))

    def accept(self, token: int) -> bool:
        """Take the next token (sampled for a whole batch by :func:`sample_tokens`); returns True while the request
        goes on."""
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
