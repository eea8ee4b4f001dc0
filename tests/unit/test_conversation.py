"""Tests of the conversation templates: pinned prompt strings derived by hand from the original
``llava/conversation.py`` (microsoft/LLaVA-Med v1.5, haotian-liu/LLaVA), plus the multi-image and copy rules."""

from __future__ import annotations

import json

import pytest

from llava_med.conversation import (
    DEFAULT_CONV_MODE,
    Conversation,
    SeparatorStyle,
    conv_mode_for_config,
    conv_templates,
    get_conv_template,
    template_names,
)

IMG = object()  # any stored image object; the module never looks inside it

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def two_turns(name: str, first: object = None) -> Conversation:
    """The two-turn chat every pinned prompt uses; the first message carries one image by default."""
    conv = get_conv_template(name)
    user, assistant = conv.roles
    conv.append_message(user, first if first is not None else ("What is shown?", IMG, "Default"))
    conv.append_message(assistant, "A chest X-ray.")
    conv.append_message(user, "Is there an effusion?")
    conv.append_message(assistant, None)
    return conv


# --------------------------------------------------------------------------- pinned prompts


def test_mistral_instruct_two_turns_pinned() -> None:
    conv = two_turns("mistral_instruct")
    assert conv.get_prompt() == (
        "[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>[INST] Is there an effusion? [/INST]"
    )
    assert conv.stop_str == "</s>"


def test_mistral_instruct_template_fields() -> None:
    conv = get_conv_template("mistral_instruct")
    assert conv.system == ""
    assert conv.roles == ("USER", "ASSISTANT")
    assert conv.version == "llama_v2"
    assert conv.sep_style is SeparatorStyle.LLAMA_2
    assert (conv.sep, conv.sep2) == ("", "</s>")
    assert conv.messages == [] and conv.offset == 0
    assert DEFAULT_CONV_MODE == "mistral_instruct"


def test_mistral_instruct_first_turn_pinned() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("What is shown?", IMG, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] <image>\nWhat is shown? [/INST]"


def test_llava_v1_two_turns_pinned() -> None:
    # LLaVA-Med v1.5's TWO style: stripped messages, "</s> " after an answer, whole prompt stripped.
    assert two_turns("llava_v1").get_prompt() == (
        LLAVA_V1_SYSTEM
        + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? ASSISTANT:"
    )
    assert two_turns("llava_v1").stop_str == "</s>"


def test_vicuna_v1_two_turns_pinned() -> None:
    assert two_turns("vicuna_v1").get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
        " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s> USER: Is there an effusion? ASSISTANT:"
    )
    assert get_conv_template("v1").get_prompt() == get_conv_template("vicuna_v1").get_prompt()


def test_llava_llama_2_two_turns_pinned() -> None:
    assert two_turns("llava_llama_2").get_prompt() == (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n"
        "<image>\nWhat is shown? [/INST] A chest X-ray. </s><s>[INST] Is there an effusion? [/INST]"
    )
    assert two_turns("llava_llama_2").stop_str == "</s>"


def test_llama_2_system_prompt_exact() -> None:
    conv = get_conv_template("llama_2")
    conv.append_message("USER", "Hi")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
        "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
        "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
        "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
        "something not correct. If you don't know the answer to a question, please don't share false "
        "information.\n<</SYS>>\n\nHi [/INST]"
    )


def test_plain_two_turns_pinned() -> None:
    # The original raised TypeError here (sep2 is None); None now counts as "".
    assert two_turns("plain").get_prompt() == "<image>\nWhat is shown?\nA chest X-ray.Is there an effusion?\n"
    assert two_turns("plain").stop_str is None


def test_plain_first_turn_pinned() -> None:
    conv = get_conv_template("plain")
    conv.append_message("", ("Describe.", IMG, "Default"))
    conv.append_message("", None)
    assert conv.get_prompt() == "<image>\nDescribe.\n"


def test_mpt_two_turns_pinned() -> None:
    assert two_turns("mpt").get_prompt() == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA chest X-ray.<|im_end|>"
        "<|im_start|>user\nIs there an effusion?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert two_turns("mpt").stop_str == "<|im_end|>"


def test_llava_v0_two_turns_pinned() -> None:
    assert two_turns("llava_v0").get_prompt() == (
        LLAVA_V1_SYSTEM
        + "###Human: <image>\nWhat is shown?###Assistant: A chest X-ray.###Human: Is there an effusion?###Assistant:"
    )
    assert two_turns("llava_v0").stop_str == "###"


def test_v1_mmtag_inserts_image_exchange() -> None:
    assert two_turns("v1_mmtag").get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant is able to "
        "understand the visual content that the user provides, and assist the user with a variety of tasks using "
        "natural language.The visual content will be provided with the following format: "
        "<Image>visual content</Image>."
        " USER: <Image><image></Image> ASSISTANT: Received.</s> USER: What is shown? ASSISTANT: A chest X-ray.</s>"
        " USER: Is there an effusion? ASSISTANT:"
    )


def test_default_template_keeps_few_shot_example() -> None:
    conv = get_conv_template("default")
    assert conv.offset == 2 and len(conv.messages) == 2
    assert conv.messages[0] == [
        "Human",
        "What are the key differences between renewable and non-renewable energy sources?",
    ]
    assert conv.messages[1][1].endswith("their depletion can lead to economic and social instability.\n")
    assert conv.get_prompt().startswith(LLAVA_V1_SYSTEM + "###Human: What are the key differences")
    assert conv.to_messages() == [] and conv.get_images() == []


def test_template_names_match_original() -> None:
    assert set(template_names()) == {
        "default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "plain", "v0_plain",
        "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt",
    }  # fmt: skip


# --------------------------------------------------------------------------- image tags


def test_image_tag_in_middle_moves_to_front() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Look at this <image> and describe it.", IMG, "Pad"))
    conv.append_message("ASSISTANT", None)
    # The original: "<image>\n" + text.replace("<image>", "").strip(); the inner double space stays.
    assert conv.get_prompt() == "[INST] <image>\nLook at this  and describe it. [/INST]"


def test_image_tag_at_end_moves_to_front_like_original_web_server() -> None:
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("What is shown?\n<image>", IMG, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == LLAVA_V1_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"


def test_multi_image_missing_tags_go_to_front() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Compare them.", ["a.png", "b.png"], "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] <image>\n<image>\nCompare them. [/INST]"


def test_multi_image_existing_tags_stay_in_place() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Before <image> after <image>", [b"1", b"2"], "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] Before <image> after <image> [/INST]"

    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Before <image> after", [b"1", b"2", b"3"], "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] <image>\n<image>\nBefore <image> after [/INST]"


def test_more_tags_than_images_is_an_error() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("<image> <image> <image>", [b"1", b"2"], "Default"))
    conv.append_message("ASSISTANT", None)
    with pytest.raises(ValueError, match="3 <image> tags but only 2 images"):
        conv.get_prompt()


def test_single_image_in_a_list_follows_original_rule() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("A <image> B", [IMG], "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] <image>\nA  B [/INST]"


def test_later_user_message_with_image_gets_a_tag() -> None:
    conv = two_turns("mistral_instruct")
    conv.update_last_message("Yes.")
    conv.append_message("USER", ("And this one?", "c.png", "Resize"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == (
        "[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>[INST] Is there an effusion? [/INST] Yes. </s>"
        "[INST] <image>\nAnd this one? [/INST]"
    )
    assert conv.get_prompt().count("<image>") == len(conv.get_images()) == 2


def test_get_images_order_and_modes() -> None:
    a, b, c, d = object(), b"png-bytes", "/tmp/c.png", object()
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("first", [a, b], "Pad"))
    conv.append_message("ASSISTANT", "ok")
    conv.append_message("USER", "text only")
    conv.append_message("ASSISTANT", "ok")
    conv.append_message("USER", ("third", (c, d), "Crop"))
    conv.append_message("ASSISTANT", None)
    images = conv.get_images()
    assert len(images) == 4
    assert all(x is y for x, y in zip(images, [a, b, c, d]))
    assert conv.get_image_modes() == ["Pad", "Pad", "Crop", "Crop"]


def test_no_images_and_none_image() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Just text", None, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_images() == [] and conv.get_image_modes() == []
    assert conv.get_prompt() == "[INST] Just text [/INST]"


def test_bad_message_shapes_rejected() -> None:
    conv = get_conv_template("mistral_instruct")
    with pytest.raises(ValueError):
        conv.append_message("USER", ("text", IMG))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        conv.append_message("USER", 42)  # type: ignore[arg-type]
    assert conv.messages == []


def test_llama_2_first_message_must_be_user() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("ASSISTANT", "hello")
    with pytest.raises(ValueError, match="first message should come from user"):
        conv.get_prompt()


# --------------------------------------------------------------------------- copies and templates


def test_get_conv_template_returns_fresh_copies() -> None:
    first = get_conv_template("mistral_instruct")
    first.append_message("USER", "hi")
    first.system = "changed"
    second = get_conv_template("mistral_instruct")
    assert second.messages == [] and second.system == ""
    assert conv_templates["mistral_instruct"].messages == []
    assert first is not second and first.messages is not second.messages


def test_conv_templates_is_read_only() -> None:
    with pytest.raises(TypeError):
        conv_templates["new"] = get_conv_template("plain")  # type: ignore[index]


def test_copy_is_independent() -> None:
    conv = two_turns("mistral_instruct")
    conv.update_last_message("No.")
    images = ["a.png"]
    conv.append_message("USER", ("more", images, "Default"))
    before = conv.get_prompt()
    clone = conv.copy()
    clone.append_message("ASSISTANT", "answer")
    clone.update_last_message("changed")
    clone.messages[0][1] = "replaced"
    images.append("b.png")  # the caller's list is not the stored one
    assert conv.get_prompt() == before
    assert len(conv.messages) == 5 and len(clone.messages) == 6
    assert conv.get_images() == [IMG, "a.png"]
    assert get_conv_template("mistral_instruct").messages == []


def test_copy_preserves_fields() -> None:
    conv = two_turns("llava_v1")
    conv.skip_next = True
    clone = conv.copy()
    assert clone == conv
    assert clone.get_prompt() == conv.get_prompt()


def test_unknown_template_error_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        get_conv_template("llava_med_v9")
    message = str(info.value)
    assert "llava_med_v9" in message
    for name in ("mistral_instruct", "llava_v1", "plain", "mpt"):
        assert name in message


# --------------------------------------------------------------------------- views


def test_dict_is_json_able_and_detached() -> None:
    conv = two_turns("mistral_instruct")
    data = conv.dict()
    assert data == {
        "system": "",
        "roles": ["USER", "ASSISTANT"],
        "messages": [
            ["USER", "What is shown?"],
            ["ASSISTANT", "A chest X-ray."],
            ["USER", "Is there an effusion?"],
            ["ASSISTANT", None],
        ],
        "offset": 0,
        "sep": "",
        "sep2": "</s>",
    }
    json.dumps(data)
    data["messages"].append(["USER", "x"])
    assert len(conv.messages) == 4


def test_to_messages() -> None:
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", ("Compare <image> with this.", ["a", "b"], "Default"))
    conv.append_message("ASSISTANT", "They differ.")
    conv.append_message("USER", "<image>\nAnd this?")
    conv.append_message("ASSISTANT", None)
    assert conv.to_messages() == [
        {"role": "user", "content": "Compare  with this.", "images": 2},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "And this?", "images": 1},
    ]


def test_to_messages_plain_roles_by_position() -> None:
    conv = two_turns("plain")
    assert [m["role"] for m in conv.to_messages()] == ["user", "assistant", "user"]


# --------------------------------------------------------------------------- config -> template


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llava_mistral", "_name_or_path": "llava-v1.5-7b"}, "mistral_instruct"),
        ({"model_type": "llava_llama", "_name_or_path": "llava-med-v1.5-mistral"}, "llava_v1"),
        ({"model_type": "llava"}, "llava_v1"),
        ({"model_type": "llava_mpt"}, "mpt"),
        ({"model_type": "llava_mistral", "conv_mode": "plain"}, "plain"),
        ({"model_type": "mystery", "conv_mode": "vicuna_v1"}, "vicuna_v1"),
        ({"model_type": "llava_mistral", "conv_mode": None}, "mistral_instruct"),
    ],
)
def test_conv_mode_for_config(config: dict, expected: str) -> None:
    assert conv_mode_for_config(config) == expected


@pytest.mark.parametrize("config", [{}, {"model_type": "mistral"}, {"model_type": None}])
def test_conv_mode_for_config_unknown_asks_for_flag(config: dict) -> None:
    with pytest.raises(ValueError, match="--conv-mode"):
        conv_mode_for_config(config)


def test_conv_mode_for_config_rejects_unknown_explicit_mode() -> None:
    with pytest.raises(ValueError, match="not a known template"):
        conv_mode_for_config({"model_type": "llava_mistral", "conv_mode": "nope"})
