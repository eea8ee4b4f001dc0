"""Synchronous Python client of the controller and workers (used by the web UI, test_message and scripts).

    client = LlavaMedClient("http://localhost:21001")
    print(client.list_models())
    for chunk in client.generate_stream("llava-med-v1.5-mistral-7b", "[INST] <image>\\nWhat is it? [/INST]",
                                        images=[pil_image]):
        print(chunk.output)

Errors raise :class:`ClientError` subclasses: :class:`NoWorkerError` (no worker serves the model),
:class:`WorkerError` (an error chunk: ``code`` and ``message``), :class:`ClientTimeoutError`,
:class:`ClientConnectionError` (unreachable, or the connection died mid-stream).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import httpx
import requests

from llava_med.chat import ChatPrompt, Message, render_chat, resolve_conv_mode
from llava_med.constants import ErrorCode, worker_api_timeout
from llava_med.sampling import CHAT_DEFAULTS
from llava_med.serve.protocol import (
    ConvTemplateResponse,
    StreamChunk,
    StreamProtocolError,
    WorkerStatus,
    error_cause,
    aiter_chunks,
    iter_chunks,
)

__all__ = [
    "AsyncLlavaMedClient",
    "LlavaMedClient",
    "ClientChunk",
    "ClientError",
    "NoWorkerError",
    "WorkerError",
    "ClientTimeoutError",
    "ClientConnectionError",
    "encode_image",
]

CONNECT_TIMEOUT = 5.0

logger = logging.getLogger(__name__)


class ClientError(Exception):
    """Base class of the client's errors."""


class WorkerError(ClientError):
    """The server answered an error chunk (or an error status); ``code`` is its ErrorCode."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (error_code {int(code)})")
        self.code = int(code)
        self.message = message

    @property
    def error_code(self) -> ErrorCode | int:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return self.code


class NoWorkerError(WorkerError):
    """No worker serves the requested model."""

    def __init__(self, message: str, code: int = ErrorCode.CONTROLLER_NO_WORKER) -> None:
        super().__init__(code, message)


class ClientTimeoutError(ClientError):
    """The server did not answer in time."""


class ClientConnectionError(ClientError):
    """The server could not be reached, or the connection broke (for instance the worker died mid-stream)."""


class ClientChunk(StreamChunk):
    """A stream chunk plus ``output``: the generated text alone (the prompt echo removed)."""

    output: str = ""


def encode_image(image: Any) -> str:
    """A PIL image, raw bytes, a local file (``pathlib.Path``; PNG, JPEG, DICOM... read here, decoded by the worker)
    or a base64 string -> the base64 string the wire carries."""
    if isinstance(image, str):
        return image
    if isinstance(image, os.PathLike):
        with open(image, "rb") as fh:
            return base64.b64encode(fh.read()).decode("ascii")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if hasattr(image, "save") and hasattr(image, "size"):  # PIL.Image.Image, without importing PIL here
        from llava_med.images.decode import encode_image_base64

        return encode_image_base64(image)
    raise TypeError(f"images must be PIL images, bytes, pathlib.Path files or base64 strings, got "
                    f"{type(image).__name__}")


def http_error(url: str, status: int, body: str) -> WorkerError:
    """The error a non-200 answer stands for (our servers send ``{"error_code", "message"}``)."""
    try:
        data = json.loads(body)
        code = int(data.get("error_code", ErrorCode.INTERNAL_ERROR))
        message = data.get("message") or data.get("detail") or body
    except (ValueError, AttributeError, TypeError):
        code, message = int(ErrorCode.INTERNAL_ERROR), body[:500]
    return WorkerError(code, f"{url} answered HTTP {status}: {message}")


def chunk_error(chunk: StreamChunk) -> WorkerError:
    """The error an error chunk stands for (:class:`NoWorkerError` when no worker serves the model)."""
    message = error_cause(chunk)
    if chunk.error_code == ErrorCode.CONTROLLER_NO_WORKER:
        return NoWorkerError(message)
    return WorkerError(chunk.error_code, message)


def client_chunk(chunk: StreamChunk, echo_prefix: str | None) -> ClientChunk:
    """A stream chunk with ``output``: the text without the echoed prompt."""
    text = chunk.text
    output = text[len(echo_prefix):] if echo_prefix is not None and text.startswith(echo_prefix) else text
    return ClientChunk(**chunk.model_dump(), output=output)


def generate_payload(model: str | None, prompt: str, images: Sequence[Any] | None = None, *,
                     temperature: float = CHAT_DEFAULTS.temperature, top_p: float = CHAT_DEFAULTS.top_p,
                     max_new_tokens: int = CHAT_DEFAULTS.max_new_tokens, stop: str | Sequence[str] | None = None,
                     seed: int | None = None, echo: bool = True, **extra: Any) -> dict[str, Any]:
    """The JSON body of ``/worker_generate_stream`` (images encoded as the wire carries them)."""
    payload: dict[str, Any] = {
        "model": model, "prompt": prompt, "temperature": temperature, "top_p": top_p,
        "max_new_tokens": max_new_tokens, "stop": stop if stop is None or isinstance(stop, str) else list(stop),
        "echo": echo, **extra,
    }
    if images:
        payload["images"] = [encode_image(image) for image in images]
    if seed is not None:
        payload["seed"] = seed
    return payload


def _is_read_timeout(exc: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ReadTimeoutError) or any(isinstance(a, ReadTimeoutError) for a in current.args):
            return True
        current = current.__cause__ or current.__context__
    return False


class LlavaMedClient:
    """Client of a controller (``controller_url``) and/or one worker (``worker_url``).

    Generation goes to ``worker_url`` when given; otherwise the controller picks a worker
    (``/get_worker_address``) or, with ``via_controller=True``, relays the stream.
    ``timeout`` bounds each wait for bytes from a server (connecting takes at most 5 s).
    """

    def __init__(
        self,
        controller_url: str | None = None,
        worker_url: str | None = None,
        timeout: float | None = None,
        *,
        auth_token: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if not controller_url and not worker_url:
            raise ValueError("give controller_url, worker_url or both")
        self.controller_url = controller_url.rstrip("/") if controller_url else None
        self.worker_url = worker_url.rstrip("/") if worker_url else None
        self.timeout = worker_api_timeout() if timeout is None else float(timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.auth_token = auth_token
        self.session = session or requests.Session()
        self.session.trust_env = False

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> LlavaMedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ plumbing
    @property
    def _timeouts(self) -> tuple[float, float]:
        return (min(CONNECT_TIMEOUT, self.timeout), self.timeout)

    def _controller(self) -> str:
        if not self.controller_url:
            raise ClientError("this client has no controller_url")
        return self.controller_url

    def _post(self, url: str, json: Any = None, **kwargs: Any) -> requests.Response:
        try:
            resp = self.session.post(url, json=json, timeout=self._timeouts, **kwargs)
        except requests.Timeout as exc:
            raise ClientTimeoutError(f"{url} did not answer within {self.timeout:g} s") from exc
        except requests.RequestException as exc:
            raise ClientConnectionError(f"cannot reach {url}: {exc}") from exc
        if resp.status_code != 200:
            raise self._http_error(url, resp)
        return resp

    @staticmethod
    def _http_error(url: str, resp: requests.Response) -> WorkerError:
        return http_error(url, resp.status_code, resp.text)

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    # ------------------------------------------------------------------------------------------------ controller
    def refresh_all_workers(self) -> bool:
        """Ask the controller to re-check every worker now. It changes the registry, so it needs the controller's
        token (``auth_token``) or a client on the controller's machine; returns False when refused (the registry
        stays fresh by itself through heartbeats)."""
        try:
            self._post(self._controller() + "/refresh_all_workers", headers=self._auth_headers())
        except WorkerError as exc:
            if exc.code != ErrorCode.INVALID_AUTH_KEY:
                raise
            logger.info("the controller refused a refresh (%s); using its registry as it is", exc.message)
            return False
        return True

    def list_models(self) -> list[str]:
        return sorted(self._post(self._controller() + "/list_models").json()["models"])

    def get_worker_address(self, model: str) -> str:
        """The address of a worker serving ``model``; NoWorkerError when none does."""
        address = self._post(self._controller() + "/get_worker_address", json={"model": model}).json()["address"]
        if not address:
            raise NoWorkerError(f"no worker serves model {model!r}; available models: {self.list_models()}")
        return address

    def worker_status(self, url: str | None = None) -> WorkerStatus:
        """``/worker_get_status`` of ``url`` (default: this client's worker, else its controller)."""
        target = (url or self.worker_url or self._controller()).rstrip("/")
        return WorkerStatus.model_validate(self._post(target + "/worker_get_status").json())

    def conv_template(self, url: str | None = None) -> str | None:
        """The prompt template a worker reports (``/worker_get_conv_template``; default: this client's worker)."""
        target = (url or self.worker_url or "").rstrip("/")
        if not target:
            raise ClientError("conv_template needs a worker URL")
        return ConvTemplateResponse.model_validate(self._post(target + "/worker_get_conv_template").json()).conv_mode

    def conv_mode_for(self, worker_url: str, explicit: str | None = None) -> str:
        """The template to render prompts for ``worker_url`` with (:func:`llava_med.chat.resolve_conv_mode`):
        ``explicit``, else what the worker reports, else ``mistral_instruct`` (also when the worker cannot say)."""
        if explicit:
            return resolve_conv_mode(explicit)
        try:
            reported = self.conv_template(worker_url)
        except ClientError as exc:  # an older worker without the endpoint, or one that went away
            logger.warning("cannot ask %s for its template (%s); using the default", worker_url, exc)
            reported = None
        return resolve_conv_mode(None, reported, source=worker_url)

    def register_worker(self, worker_name: str, check_heart_beat: bool = False,
                        worker_status: WorkerStatus | dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a worker by hand (the controller asks it for its status when ``worker_status`` is None)."""
        if isinstance(worker_status, WorkerStatus):
            worker_status = worker_status.model_dump()
        payload = {"worker_name": worker_name, "check_heart_beat": check_heart_beat, "worker_status": worker_status}
        resp = self._post(self._controller() + "/register_worker", json=payload, headers=self._auth_headers())
        try:
            return resp.json() or {}
        except ValueError:
            return {}

    # ------------------------------------------------------------------------------------------------ generation
    def generate_stream(
        self,
        model: str | None,
        prompt: str,
        images: Sequence[Any] | None = None,
        *,
        temperature: float = CHAT_DEFAULTS.temperature,
        top_p: float = CHAT_DEFAULTS.top_p,
        max_new_tokens: int = CHAT_DEFAULTS.max_new_tokens,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        echo: bool = True,
        via_controller: bool = False,
        **extra: Any,
    ) -> Iterator[ClientChunk]:
        """Stream a generation as :class:`ClientChunk` (cumulative ``text``; ``output`` without the prompt).

        Raises a :class:`ClientError` subclass for error chunks and network failures. Closing the iterator
        closes the HTTP response (the worker then cancels the generation).
        """
        if self.worker_url and not via_controller:
            target = self.worker_url
        elif via_controller:
            target = self._controller()
        else:
            if not model:
                raise ValueError("model is required to find a worker through the controller")
            target = self.get_worker_address(model)
        return self._stream_to(target, model, prompt, images, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, stop=stop, seed=seed, echo=echo, **extra)

    def _stream_to(self, target: str, model: str | None, prompt: str, images: Sequence[Any] | None,
                   **kwargs: Any) -> Iterator[ClientChunk]:
        payload = generate_payload(model, prompt, images, **kwargs)
        return self._stream(target + "/worker_generate_stream", payload, prompt if payload["echo"] else None)

    def _stream(self, url: str, payload: dict[str, Any], echo_prefix: str | None) -> Iterator[ClientChunk]:
        try:
            resp = self.session.post(url, json=payload, stream=True, timeout=self._timeouts)
        except requests.Timeout as exc:
            raise ClientTimeoutError(f"{url} did not answer within {self.timeout:g} s") from exc
        except requests.RequestException as exc:
            raise ClientConnectionError(f"cannot reach {url}: {exc}") from exc
        with resp:
            if resp.status_code != 200:
                raise self._http_error(url, resp)
            try:
                for chunk in iter_chunks(resp.iter_content(chunk_size=None)):
                    if chunk.error_code:
                        raise chunk_error(chunk)
                    yield client_chunk(chunk, echo_prefix)
            except requests.Timeout as exc:
                raise ClientTimeoutError(f"{url} sent nothing for {self.timeout:g} s") from exc
            except requests.RequestException as exc:
                if _is_read_timeout(exc):  # requests reports a read timeout inside iter_content as ConnectionError
                    raise ClientTimeoutError(f"{url} sent nothing for {self.timeout:g} s") from exc
                raise ClientConnectionError(f"the connection to {url} broke during generation: {exc}") from exc
            except StreamProtocolError as exc:
                raise ClientConnectionError(f"the stream from {url} was cut or garbled: {exc}") from exc

    def generate(self, model: str | None, prompt: str, images: Sequence[Any] | None = None, **kwargs: Any) -> str:
        """The whole generated text (without the prompt)."""
        return _final_output(self.generate_stream(model, prompt, images, **kwargs))

    # ------------------------------------------------------------------------------------------------ chat
    def render(self, model: str | None, messages: Iterable[Message | Mapping[str, Any]], *,
               conv_mode: str | None = None, image_process_mode: str = "Default") -> tuple[str, ChatPrompt]:
        """The worker that will answer and the prompt rendered with its template (see :meth:`chat`)."""
        worker = self.worker_url or self.get_worker_address(model or "")
        rendered = render_chat(messages, self.conv_mode_for(worker, conv_mode), image_process_mode=image_process_mode)
        return worker, rendered

    def chat(self, model: str | None, messages: Iterable[Message | Mapping[str, Any]], *, stream: bool = False,
             conv_mode: str | None = None, image_process_mode: str = "Default", **kwargs: Any) -> Any:
        """Answer the last user message of a conversation.

        ``messages`` are :class:`llava_med.chat.Message` objects or mappings ``{"role", "content", "images"?}``
        (images: PIL images, bytes, ``pathlib.Path`` files or base64 strings). The prompt is rendered with the
        template the serving worker reports (or ``conv_mode``), with its stop string. ``stream=False`` returns the
        answer; ``stream=True`` an iterator of :class:`ClientChunk` (``output``: the answer so far). Other keyword
        arguments (temperature, top_p, max_new_tokens, seed, ...) go to :meth:`generate_stream`.
        """
        worker, rendered = self.render(model, messages, conv_mode=conv_mode, image_process_mode=image_process_mode)
        kwargs.setdefault("stop", list(rendered.stop))
        chunks = self._stream_to(worker, model, rendered.prompt, rendered.images,
                                 image_process_mode=image_process_mode, **kwargs)
        return chunks if stream else _final_output(chunks)


def _final_output(chunks: Iterable[ClientChunk]) -> str:
    """The answer of a whole stream: each chunk's ``output`` is the answer so far."""
    output = ""
    for chunk in chunks:
        output = chunk.output
    return output


class AsyncLlavaMedClient:
    """The asyncio client of a controller and its workers (for servers built on the stack, such as the
    OpenAI-compatible API). Same errors as :class:`LlavaMedClient`; ``timeout`` bounds each wait for bytes."""

    def __init__(self, controller_url: str, *, timeout: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.timeout = worker_api_timeout() if timeout is None else float(timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.http = httpx.AsyncClient(
            transport=transport, trust_env=False,
            timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, url: str, json: Any = None) -> httpx.Response:
        try:
            resp = await self.http.post(url, json=json)
        except httpx.TimeoutException as exc:
            raise ClientTimeoutError(f"{url} did not answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise ClientConnectionError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise http_error(url, resp.status_code, resp.text)
        return resp

    async def list_models(self) -> list[str]:
        return sorted((await self._post(self.controller_url + "/list_models")).json()["models"])

    async def get_worker_address(self, model: str) -> str:
        """The address of a worker serving ``model``; NoWorkerError when none does."""
        address = (await self._post(self.controller_url + "/get_worker_address", {"model": model})).json()["address"]
        if not address:
            raise NoWorkerError(f"no worker serves model {model!r}; available models: {await self.list_models()}")
        return address

    async def conv_mode_for(self, worker_url: str, explicit: str | None = None) -> str:
        """As :meth:`LlavaMedClient.conv_mode_for`."""
        if explicit:
            return resolve_conv_mode(explicit)
        try:
            resp = await self._post(worker_url.rstrip("/") + "/worker_get_conv_template")
            reported = ConvTemplateResponse.model_validate(resp.json()).conv_mode
        except ClientError as exc:
            logger.warning("cannot ask %s for its template (%s); using the default", worker_url, exc)
            reported = None
        return resolve_conv_mode(None, reported, source=worker_url)

    async def count_tokens(self, worker_url: str, prompt: str) -> int:
        """``/count_token`` of a worker: the prompt's positions, each ``<image>`` counted as its image tokens."""
        return int((await self._post(worker_url.rstrip("/") + "/count_token", {"prompt": prompt})).json()["count"])

    async def generate_stream(self, target: str, payload: dict[str, Any]) -> AsyncIterator[ClientChunk]:
        """Stream ``payload`` (see :func:`generate_payload`) from ``target`` (a worker, or a controller that
        relays). Closing the iterator closes the connection, and the worker cancels the generation."""
        url = target.rstrip("/") + "/worker_generate_stream"
        echo_prefix = payload["prompt"] if payload.get("echo", True) else None
        try:
            async with self.http.stream("POST", url, json=payload) as resp:
                if resp.status_code != 200:
                    raise http_error(url, resp.status_code, (await resp.aread()).decode("utf-8", "replace"))
                async for chunk in aiter_chunks(resp.aiter_bytes()):
                    if chunk.error_code:
                        raise chunk_error(chunk)
                    yield client_chunk(chunk, echo_prefix)
        except httpx.TimeoutException as exc:
            raise ClientTimeoutError(f"{url} sent nothing for {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise ClientConnectionError(f"the connection to {url} broke: {type(exc).__name__}: {exc}") from exc
        except StreamProtocolError as exc:
            raise ClientConnectionError(f"the stream from {url} was cut or garbled: {exc}") from exc
