"""A scripted, deterministic engine: fast tests of every server path, and ``--engine fake`` demos.

Tokens are whitespace-separated words. The reply is ``script`` (when given) or a sentence built from the last
words of the prompt; it is the same for the same request whatever the sampling parameters. Each ``<image>`` counts
as ``image_tokens`` prompt tokens, so context overflow is easy to provoke. Images are only base64-decoded (the fake
never looks at pixels). A request that sets DICOM options starts its reply with them as one word
(``[dicom_window=lung,dicom_frame=2]``), so tests through real processes see what reached the engine.

Counters (``started``, ``finished``, ``cancelled``, ``failed``, ``steps``, ``max_running``) let tests check that a
closed stream really cancelled its request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Sequence

from llava_med.constants import DEFAULT_IMAGE_TOKEN
from llava_med.conversation import DEFAULT_CONV_MODE
from llava_med.engine.base import Engine, EngineRequest, GenerationOutput
from llava_med.errors import ContextOverflowError, ImageCountMismatchError, ImageError, LlavaMedError
from llava_med.model.naming import model_name_from_path

__all__ = ["FakeEngine", "DEFAULT_FAKE_MODEL_NAME"]

logger = logging.getLogger(__name__)

DEFAULT_FAKE_MODEL_NAME = "llava-med-fake"


class FakeEngine(Engine):
    """Deterministic scripted engine.

    Args:
        model_names: names the worker serves.
        script: the reply (words separated by spaces); default: derived from the prompt.
        token_delay: seconds per generated token (per step).
        load_delay: seconds :meth:`start` takes (spent in a thread, like a real load).
        context_length: fake context size, in tokens.
        image_tokens: prompt tokens each ``<image>`` counts for.
        fail_after: raise ``fail_with`` after this many tokens of every request (None: never).
        fail_with: the exception to raise (default ``RuntimeError("injected engine failure")``).
        load_error: make :meth:`start` raise this.
        conv_mode: the template name reported by :attr:`conv_mode` (default ``mistral_instruct``).
    """

    def __init__(
        self,
        model_names: Sequence[str] = (DEFAULT_FAKE_MODEL_NAME,),
        *,
        script: str | None = None,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        context_length: int = 2048,
        image_tokens: int = 576,
        fail_after: int | None = None,
        fail_with: BaseException | None = None,
        load_error: BaseException | None = None,
        conv_mode: str | None = DEFAULT_CONV_MODE,
    ) -> None:
        if isinstance(model_names, str):
            model_names = [model_names]
        if not model_names or not all(isinstance(n, str) and n for n in model_names):
            raise ValueError(f"model_names must be a non-empty list of names, got {model_names!r}")
        if token_delay < 0 or load_delay < 0:
            raise ValueError("token_delay and load_delay must be >= 0")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0, got {image_tokens}")
        if fail_after is not None and fail_after < 0:
            raise ValueError(f"fail_after must be >= 0 or None, got {fail_after}")
        self.model_names = list(model_names)
        self.script = script
        self.token_delay = token_delay
        self.load_delay = load_delay
        self._context_length = context_length
        self.image_tokens = image_tokens
        self.fail_after = fail_after
        self.fail_with = fail_with
        self.load_error = load_error
        self._conv_mode = conv_mode
        self._ready = False
        self._running = 0
        # Counters for tests.
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.failed = 0
        self.rejected = 0
        self.steps = 0
        self.max_running = 0
        self.requests: list[EngineRequest] = []

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("fake engine (--engine fake)")
        group.add_argument("--fake-script", type=str, default=None, help="the reply (default: derived from the prompt)")
        group.add_argument("--fake-token-delay", type=float, default=0.02, help="seconds per token")
        group.add_argument("--fake-load-delay", type=float, default=0.0, help="seconds the fake load takes")
        group.add_argument("--fake-context-length", type=int, default=2048)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FakeEngine:
        name = args.model_name or (model_name_from_path(args.model_path) if args.model_path else None)
        return cls(
            [name or DEFAULT_FAKE_MODEL_NAME], script=args.fake_script, token_delay=args.fake_token_delay,
            load_delay=args.fake_load_delay, context_length=args.fake_context_length,
            conv_mode=args.conv_mode or DEFAULT_CONV_MODE,
        )

    # ----------------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def conv_mode(self) -> str | None:
        return self._conv_mode

    async def start(self) -> None:
        if self.load_delay:
            await asyncio.to_thread(time.sleep, self.load_delay)
        if self.load_error is not None:
            raise self.load_error
        self._ready = True
        logger.info("fake engine ready: models %s, context length %d", self.model_names, self._context_length)

    async def shutdown(self) -> None:
        self._ready = False

    def queue_length(self) -> int:
        return self._running

    def metrics(self) -> dict[str, float]:
        return {"running_requests": self._running, "finished_requests": self.finished,
                "cancelled_requests": self.cancelled, "failed_requests": self.failed}

    def count_tokens(self, prompt: str) -> int:
        return self._count_prompt_tokens(prompt)

    # ----------------------------------------------------------------------------------------------------------
    def _count_prompt_tokens(self, prompt: str) -> int:
        n_images = prompt.count(DEFAULT_IMAGE_TOKEN)
        words = prompt.replace(DEFAULT_IMAGE_TOKEN, " ").split()
        return len(words) + n_images * self.image_tokens

    def reply_words(self, prompt: str) -> list[str]:
        """The words the fake answers ``prompt`` with (before stop strings and length limits)."""
        if self.script is not None:
            return self.script.split()
        # Answer about the last user words: the text after the last [/INST] or ASSISTANT: marker if any.
        tail = prompt
        for marker in ("[/INST]", "ASSISTANT:", "### Assistant:"):
            head, sep, _ = tail.rpartition(marker)
            if sep:
                tail = head
                break
        words = tail.replace(DEFAULT_IMAGE_TOKEN, " ").replace("[INST]", " ").split()[-8:] or ["nothing"]
        return ["This", "is", "a", "fake", "answer", "about:", *words, "(end)"]

    def _check(self, request: EngineRequest) -> int:
        images = request.images
        n_tags = request.prompt.count(DEFAULT_IMAGE_TOKEN)
        if len(images) != n_tags:
            raise ImageCountMismatchError(
                f"the prompt has {n_tags} {DEFAULT_IMAGE_TOKEN} tag(s) but {len(images)} image(s) were sent; "
                f"put one {DEFAULT_IMAGE_TOKEN} in the prompt per image"
            )
        for i, image in enumerate(images):
            data = image.split(",", 1)[1] if image.startswith("data:") and "," in image else image
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"image {i} is not valid base64: {exc}") from exc
            if not raw:
                raise ImageError(f"image {i} is empty")
        n_prompt = self._count_prompt_tokens(request.prompt)
        if n_prompt + 1 > self._context_length:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens (including {n_tags * self.image_tokens} image tokens) but the "
                f"context length is {self._context_length}; start a new conversation or shorten the prompt"
            )
        return n_prompt

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[GenerationOutput]:
        if not self._ready:
            raise LlavaMedError("the model is not loaded yet")
        try:
            n_prompt = self._check(request)
        except LlavaMedError:
            self.rejected += 1
            raise
        words = self.reply_words(request.prompt)
        if request.dicom is not None:
            words = [f"[dicom_window={request.dicom.window},dicom_frame={request.dicom.frame}]", *words]
        params = request.params
        max_new = min(params.max_new_tokens, self._context_length - n_prompt)
        stops = params.stop

        self.requests.append(request)
        self.started += 1
        self._running += 1
        self.max_running = max(self.max_running, self._running)
        done = False
        try:
            generated: list[str] = []
            i = 0
            while True:
                if i >= len(words) and not params.ignore_eos:
                    finish = "stop"
                    break
                if self.fail_after is not None and i >= self.fail_after:
                    raise self.fail_with if self.fail_with is not None else RuntimeError("injected engine failure")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                self.steps += 1
                generated.append(words[i % len(words)] if words else "...")
                i += 1
                text = " ".join(generated)
                hit = [text.index(s) for s in stops if s in text]
                if hit:
                    text = text[: min(hit)]
                    finish = "stop"
                    break
                if i >= max_new:
                    finish = "length"
                    break
                yield GenerationOutput(text, None, n_prompt, i)
            done = True
            self.finished += 1
            yield GenerationOutput(text if generated else "", finish, n_prompt, i)
        except (GeneratorExit, asyncio.CancelledError):
            if not done:
                self.cancelled += 1
            raise
        except BaseException:
            self.failed += 1
            raise
        finally:
            self._running -= 1
