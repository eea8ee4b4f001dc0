"""llava_med.chat: one rendering of a conversation into a template's prompt, shared by every front end."""

from __future__ import annotations

import pytest

from llava_med.chat import ChatPrompt, Message, render_chat, resolve_conv_mode
from llava_med.errors import BadRequestError, ImageCountMismatchError

IMG, IMG2 = "aW1hZ2Ux", "aW1hZ2Uy"


def test_single_question_with_an_image_is_the_original_prompt():
    rendered = render_chat([Message("user", "  Describe the image. ", (IMG,))], "mistral_instruct")
    assert rendered == ChatPrompt("[INST] <image>\nDescribe the image. [/INST]", [IMG], "mistral_instruct", "</s>")
    assert rendered.stop == ("</s>",)
    # A tag the user typed moves to the front with one image (the original rule).
    assert render_chat([Message("user", "What is <image> this?", (IMG,))]).prompt == (
        "[INST] <image>\nWhat is  this? [/INST]")


def test_multi_turn_mistral_instruct():
    messages = [
        Message("user", "What is shown?", (IMG,)),
        Message("assistant", "A chest X-ray."),
        Message("user", "Any effusion?"),
    ]
    rendered = render_chat(messages, "mistral_instruct")
    assert rendered.prompt == "[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>[INST] Any effusion? [/INST]"
    assert rendered.images == [IMG]
    # Mappings work too (what LlavaMedClient.chat and JSON callers send).
    as_dicts = [{"role": "user", "content": "What is shown?", "images": [IMG]},
                {"role": "assistant", "content": "A chest X-ray."}, {"role": "user", "content": "Any effusion?"}]
    assert render_chat(as_dicts).prompt == rendered.prompt


def test_other_templates_and_system_prompt():
    v1 = render_chat([Message("user", "Hi", (IMG,))], "llava_v1")
    assert v1.prompt.endswith("USER: <image>\nHi ASSISTANT:") and v1.stop == ("</s>",)
    system = render_chat([Message("system", "Answer briefly."), Message("user", "Hi")], "mistral_instruct")
    assert system.prompt == "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nHi [/INST]"


def test_several_images_stay_where_they_stand():
    parts = Message.from_parts("user", [IMG, "Compare the left", IMG2, "with the right."],
                               is_image=lambda part: part in (IMG, IMG2))
    assert parts.text == "<image>\nCompare the left\n<image>\nwith the right." and parts.images == (IMG, IMG2)
    rendered = render_chat([parts])
    assert rendered.prompt == "[INST] <image>\nCompare the left\n<image>\nwith the right. [/INST]"
    assert rendered.images == [IMG, IMG2]
    # Images without tags go in front, one per line.
    assert render_chat([Message("user", "Compare.", (IMG, IMG2))]).prompt == (
        "[INST] <image>\n<image>\nCompare. [/INST]")


def test_neighbours_of_one_role_are_joined_and_stray_tags_removed():
    rendered = render_chat([Message("user", "First", (IMG,)), Message("user", "second <image> part")])
    assert rendered.prompt == "[INST] <image>\nFirst\nsecond  part [/INST]"
    assert rendered.images == [IMG]


@pytest.mark.parametrize(
    ("messages", "error", "words"),
    [
        ([], BadRequestError, "no user message"),
        ([Message("system", "s")], BadRequestError, "no user message"),
        ([Message("assistant", "a"), Message("user", "u")], BadRequestError, "start with a user message"),
        ([Message("user", "u"), Message("assistant", "a")], BadRequestError, "last message must be the user's"),
        ([Message("user", "<image> <image>", (IMG,))], ImageCountMismatchError, "2 <image> tags"),
        ([{"role": "tool", "content": "x"}], BadRequestError, "role must be one of"),
        ([{"role": "user", "content": 5}], BadRequestError, "text must be a string"),
    ],
)
def test_bad_conversations_are_clear_errors(messages, error, words):
    with pytest.raises(error, match=words):
        render_chat(messages)


def test_only_user_messages_carry_images_and_templates_are_checked():
    with pytest.raises(BadRequestError, match="only user messages"):
        Message("assistant", "a", (IMG,))
    with pytest.raises(BadRequestError, match="unknown conversation template"):
        render_chat([Message("user", "hi")], "no_such_template")


def test_resolve_conv_mode():
    assert resolve_conv_mode(None, None) == "mistral_instruct"
    assert resolve_conv_mode(None, "llava_v1") == "llava_v1"
    assert resolve_conv_mode("llava_v0", "llava_v1") == "llava_v0"
    assert resolve_conv_mode(None, "something-new") == "mistral_instruct"
    with pytest.raises(BadRequestError):
        resolve_conv_mode("nope")
