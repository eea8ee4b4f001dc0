"""Chat with a LLaVA-Med checkpoint in the terminal, or answer one question (``--query``) for scripts.

    python -m llava_med.serve.cli --model-path microsoft/llava-med-v1.5-mistral-7b --image-file scan.png
    llava-med chat --query "Describe the image." --image-file ct.dcm

Without ``--model-path`` the embedded tiny random-weight checkpoint is used (its answers are noise): that
checks an installation end to end without downloading anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llava_med.chat import Message, render_chat
from llava_med.constants import RESEARCH_ONLY_NOTICE
from llava_med.conversation import conv_mode_for_config, get_conv_template
from llava_med.errors import LlavaMedError
from llava_med.model.args import add_model_args, load_config_from_args
from llava_med.sampling import CHAT_DEFAULTS

logger = logging.getLogger("llava_med.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-med chat",
        description="Chat with LLaVA-Med about an image. " + RESEARCH_ONLY_NOTICE,
    )
    add_model_args(parser)
    parser.add_argument("--image-file", action="append", default=[],
                        help="image (PNG, JPEG, DICOM, ...) to ask about; repeat for several images")
    parser.add_argument("--image-process-mode", default="Default", choices=["Default", "Pad", "Resize", "Crop"],
                        help="how to fit the image to the vision tower (Default: the checkpoint's setting)")
    parser.add_argument("--dicom-window", type=_dicom_window, default=None, metavar="WINDOW",
                        help="window of DICOM images: soft_tissue, lung, bone, brain (CT presets, in HU), stored "
                             "(the file's own; the default, auto when it has none), auto (0.5-99.5 percentile), "
                             "or CENTER,WIDTH")
    parser.add_argument("--dicom-frame", type=_dicom_frame, default=None, metavar="N",
                        help="frame of multi-frame DICOM files, 0-based (default: the middle frame)")
    parser.add_argument("--query", default=None, help="ask this one question, print the answer and exit")
    parser.add_argument("--temperature", type=float, default=CHAT_DEFAULTS.temperature,
                        help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=CHAT_DEFAULTS.top_p, help="default %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens,
                        help="default %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--debug", action="store_true", help="log prompts and outputs")
    return parser


def _dicom_window(text: str) -> str | None:
    from llava_med.images.dicom import normalize_window

    try:
        return normalize_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dicom_frame(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


class ChatSession:
    """A multi-turn conversation about the given images on one loaded model (the images go with the first
    question, as in the web chat)."""

    def __init__(self, loaded, conv_mode: str, images: Sequence, image_mode: str, params_kwargs: dict) -> None:
        self.loaded = loaded
        self.conv_mode = conv_mode
        self.roles = get_conv_template(conv_mode).roles
        self.images = tuple(images)
        self.image_mode = image_mode
        self.params_kwargs = params_kwargs
        self.messages: list[Message] = []

    def ask(self, question: str):
        """Yield the answer's new text piece by piece; the conversation keeps the whole answer."""
        from llava_med.model.generation import generate_stream, prepare_prompt
        from llava_med.sampling import SamplingParams

        user = Message("user", question, self.images if not self.messages else ())
        rendered = render_chat([*self.messages, user], self.conv_mode, image_process_mode=self.image_mode)
        params = SamplingParams(stop=rendered.stop, **self.params_kwargs)
        prepared = prepare_prompt(self.loaded, rendered.prompt, rendered.images, image_mode=self.image_mode)
        logger.debug("prompt: %r", rendered.prompt)
        shown = ""
        answer = ""
        try:
            for update in generate_stream(self.loaded, prepared, params):
                answer = update.text
                if len(update.text) > len(shown):
                    yield update.text[len(shown):]
                    shown = update.text
        finally:
            self.messages += [user, Message("assistant", answer.strip())]
        logger.debug("output: %r", answer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from llava_med.images.decode import load_image
    from llava_med.images.dicom import DicomOptions
    from llava_med.model.builder import load_pretrained_model

    try:
        loaded = load_pretrained_model(load_config_from_args(args))
        if args.model_path is None:
            logger.warning("using the embedded tiny random-weight checkpoint: its answers are noise. "
                           "Pass --model-path microsoft/llava-med-v1.5-mistral-7b for the real model.")
        conv_mode = args.conv_mode or conv_mode_for_config(loaded.config)
        dicom = DicomOptions.of(args.dicom_window, args.dicom_frame)
        # Decoded once, before the chat starts (a bad file fails at once), with the DICOM window and frame chosen.
        images = [load_image(path, dicom=dicom) for path in args.image_file]
        session = ChatSession(
            loaded,
            conv_mode,
            images,
            args.image_process_mode,
            {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
             "seed": args.seed},
        )
        if args.query is not None:
            answer = "".join(session.ask(args.query))
            print(answer.strip(), flush=True)
            return 0
        return _interactive(session)
    except LlavaMedError as exc:
        logger.error("%s", exc)
        return 2
    except ValueError as exc:  # invalid flag combinations from LoadConfig
        logger.error("%s", exc)
        return 2


def _interactive(session: ChatSession) -> int:
    roles = session.roles
    print(RESEARCH_ONLY_NOTICE, file=sys.stderr)
    while True:
        try:
            question = input(f"{roles[0]}: ")
        except (EOFError, KeyboardInterrupt):
            question = ""
        if not question.strip():
            print("exit...", file=sys.stderr)
            return 0
        print(f"{roles[1]}: ", end="", flush=True)
        try:
            for piece in session.ask(question):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\nexit...", file=sys.stderr)
            return 0
        except LlavaMedError as exc:
            print(file=sys.stdout)
            logger.error("%s", exc)
            continue
        print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
