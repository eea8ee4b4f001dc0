"""Model-side image preprocessing: aspect modes (pad, resize, crop) and the CLIP pixel tensors.

``pad`` is LLaVA's ``expand2square`` (deterministic and centred here), ``resize`` a plain resize to the vision
tower's size, ``crop`` the CLIP processor as is (shortest-edge resize, centre crop). Decoding lives in
:mod:`llava_med.images`; torch is imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from llava_med.errors import BadRequestError, ImageError, MissingDependencyError
from llava_med.images.decode import to_rgb

if TYPE_CHECKING:
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

__all__ = [
    "ASPECT_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "expand2square",
    "make_clip_image_processor",
    "normalize_aspect_mode",
    "process_images",
    "resize_for_vision_tower",
]

#: Normalisation constants of OpenAI CLIP (identical to ``transformers.image_utils.OPENAI_CLIP_MEAN/STD``).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: The aspect modes :func:`process_images` understands.
ASPECT_MODES: tuple[str, ...] = ("pad", "resize", "crop")

# Spellings accepted by normalize_aspect_mode (web UI names are matched case-insensitively).
_ASPECT_ALIASES: Mapping[str, str] = MappingProxyType(
    # The original LLaVA pads only for "pad"; every other config value ("square" too) goes through the
    # processor as is: shortest-edge resize and centre crop.
    {"pad": "pad", "resize": "resize", "square": "crop", "crop": "crop"}
)




def expand2square(img: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pad ``img`` to a square of ``background_color``, centred and deterministic.

    Like LLaVA's ``expand2square`` but the image is pasted at ``((side - w) // 2, (side - h) // 2)`` (the
    original used a random 0-1 pixel offset). A square input is returned unchanged (the same object); a non-RGB
    input is converted to RGB first.
    """
    if len(background_color) != 3 or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in background_color
    ):
        raise ValueError(f"background_color must be three ints in 0..255, got {background_color!r}")
    width, height = img.size
    if width == height:
        return img
    rgb = to_rgb(img)
    side = max(width, height)
    result = Image.new("RGB", (side, side), tuple(int(c) for c in background_color))
    result.paste(rgb, ((side - width) // 2, (side - height) // 2))
    return result


def normalize_aspect_mode(mode: str | None, default: str | None) -> str:
    """Resolve an aspect mode name to one of :data:`ASPECT_MODES`.

    Accepts the original web UI names ``Pad``, ``Resize``, ``Crop`` and ``Default`` in any case. ``Default``
    (or ``None`` / ``""``) means ``default``, normally the checkpoint config's ``image_aspect_ratio``;
    ``square`` means ``resize``; a ``default`` of ``None`` (a config without ``image_aspect_ratio``) means
    ``crop``, which is what the original LLaVA did for any value other than ``pad``.

    Raises:
        BadRequestError: ``mode`` is unknown (a :class:`ValueError`).
        ValueError: ``default`` is unknown.
    """
    key = "" if mode is None else str(mode).strip().lower()
    if key in ("", "default"):
        default_key = "crop" if default is None else str(default).strip().lower()
        resolved = _ASPECT_ALIASES.get(default_key)
        if resolved is None:
            raise ValueError(
                f"unsupported default image aspect mode {default!r} (from the checkpoint config's "
                f"image_aspect_ratio); expected one of pad, resize, square, crop"
            )
        return resolved
    resolved = _ASPECT_ALIASES.get(key)
    if resolved is None:
        raise BadRequestError(
            f"unknown image aspect mode {mode!r}; expected one of Pad, Resize, Crop or Default"
        )
    return resolved


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value else None


def _processor_output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the processor's output: its crop size, else its fixed resize size."""
    crop = getattr(image_processor, "crop_size", None)
    height, width = _size_field(crop, "height"), _size_field(crop, "width")
    if height and width and getattr(image_processor, "do_center_crop", True):
        return height, width
    size = getattr(image_processor, "size", None)
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height and width:
        return height, width
    edge = _size_field(size, "shortest_edge")
    if edge:
        return edge, edge
    raise ValueError(f"cannot tell the output size of image processor {type(image_processor).__name__}")


def _apply_aspect_mode(images: Sequence[Image.Image], image_processor: Any, aspect_mode: str) -> list[Image.Image]:
    """RGB copies of ``images`` after the aspect step of ``aspect_mode`` (pad, resize or nothing for crop)."""
    if aspect_mode is None or str(aspect_mode).strip().lower() in ("", "default"):
        raise ValueError(
            "process_images needs a concrete aspect mode; resolve 'Default' with normalize_aspect_mode(mode, "
            "config_default) first"
        )
    mode = normalize_aspect_mode(aspect_mode, default=None)
    height, width = _processor_output_size(image_processor)
    prepared: list[Image.Image] = []
    for index, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ImageError(f"image {index} is a {type(img).__name__}, not a PIL image; decode it with load_image")
        img = to_rgb(img, f"image {index}")
        if mode == "pad":
            background = tuple(int(x * 255) for x in image_processor.image_mean)
            img = expand2square(img, background)  # type: ignore[arg-type]
        elif mode == "resize":
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        prepared.append(img)
    return prepared


def process_images(images: Sequence[Image.Image], image_processor: Any, aspect_mode: str) -> torch.Tensor:
    """Preprocess images for the vision tower; returns a float32 tensor of shape ``[N, 3, H, W]``.

    Modes (see :func:`normalize_aspect_mode` to resolve user/config names):
        * ``pad``: :func:`expand2square` on the processor's mean colour
          (``tuple(int(x * 255) for x in image_processor.image_mean)``), then the processor;
        * ``resize``: bicubic resize to the processor's crop size (aspect ratio not kept), then the processor;
        * ``crop``: the processor as is (shortest-edge resize, centre crop).

    ``image_processor`` is a transformers image processor such as ``CLIPImageProcessorPil`` (see
    :func:`make_clip_image_processor`); it is called as ``image_processor(images=[...], return_tensors="pt")``.
    """
    import torch

    prepared = _apply_aspect_mode(images, image_processor, aspect_mode)
    if not prepared:
        height, width = _processor_output_size(image_processor)
        return torch.empty((0, 3, height, width), dtype=torch.float32)
    pixel_values = image_processor(images=prepared, return_tensors="pt")["pixel_values"]
    if isinstance(pixel_values, (list, tuple)):
        pixel_values = torch.stack([torch.as_tensor(p) for p in pixel_values])
    pixel_values = torch.as_tensor(pixel_values).to(torch.float32).contiguous()
    if pixel_values.ndim != 4 or pixel_values.shape[0] != len(prepared) or pixel_values.shape[1] != 3:
        raise ValueError(
            f"image processor returned pixel values of shape {tuple(pixel_values.shape)}, expected "
            f"[{len(prepared)}, 3, H, W]"
        )
    return pixel_values


def resize_for_vision_tower(images: Sequence[Image.Image], image_processor: Any, aspect_mode: str
                            ) -> list[Image.Image]:
    """The images :func:`process_images` would feed the vision tower, as 8-bit RGB images of the tower's size
    (aspect step, then the processor's own resize and crop; no rescaling or normalisation).

    For an engine that runs the CLIP processor itself (vLLM): on these images its resize and crop change nothing,
    whichever backend (PIL or torchvision) it uses, so its pixels are those of :func:`process_images`.
    """
    prepared = _apply_aspect_mode(images, image_processor, aspect_mode)
    if not prepared:
        return []
    pixels = image_processor(images=prepared, do_rescale=False, do_normalize=False,
                             return_tensors="np")["pixel_values"]
    out = []
    for array in pixels:  # [3, H, W] floats holding the 8-bit values of the resized, cropped image
        hwc = np.clip(np.rint(np.asarray(array, dtype=np.float32)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        out.append(Image.fromarray(np.ascontiguousarray(hwc), "RGB"))
    return out


def make_clip_image_processor(
    image_size: int,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> CLIPImageProcessorPil:
    """A CLIP image processor (PIL backend, deterministic, no torchvision) for square ``image_size`` inputs.

    Shortest-edge resize to ``image_size`` (bicubic), centre crop ``image_size x image_size``, rescale by 1/255,
    normalise with ``image_mean`` / ``image_std``, convert to RGB. Used by tests and for checkpoints without a
    preprocessor config.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (R, G, B), got {list(values)!r}")
    if any(float(s) <= 0 for s in image_std):
        raise ValueError(f"image_std values must be positive, got {list(image_std)!r}")
    try:
        from transformers.image_utils import PILImageResampling
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError as exc:
        raise MissingDependencyError(
            "the CLIP image processor needs 'transformers' >= 5 (pip install 'transformers>=5')"
        ) from exc
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in image_mean],
        image_std=[float(x) for x in image_std],
        do_convert_rgb=True,
    )
