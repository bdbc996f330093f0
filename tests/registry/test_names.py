"""Model names, references, stages and tags: what a user may type, and what is refused."""

import pytest

from modelpress.errors import ConfigError, InvalidNameError, InvalidReferenceError, InvalidStageError
from modelpress.registry.names import MAX_VERSION, Ref, parse_ref, validate_name, validate_stage, validate_tag

HOSTILE_NAMES = [
    "",
    "..",
    "../evil",
    "a/../../b",
    "a/b",
    "a\\b",
    "/etc/passwd",
    ".hidden",
    "a..b",
    "nul\x00byte",
    "new\nline",
    "naïve",
    "space name",
    "semi;colon",
    "x" * 129,
]


@pytest.mark.parametrize("name", ["minilm", "minilm-sts.int8", "A_1", "x" * 128, "v2.0"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_with_an_example(name):
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    assert "minilm-sts.int8" in info.value.hint


def test_a_name_must_be_a_string():
    with pytest.raises(InvalidNameError, match="must be a string"):
        validate_name(3)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("m", Ref("m")),
        ("m:latest", Ref("m")),
        ("m:LATEST", Ref("m")),
        ("m:3", Ref("m", version=3)),
        ("m:v3", Ref("m", version=3)),
        ("  m:007 ", Ref("m", version=7)),
        ("m@production", Ref("m", stage="production")),
        ("m@Staging", Ref("m", stage="staging")),
        (f"m:{MAX_VERSION}", Ref("m", version=MAX_VERSION)),
    ],
)
def test_references(text, want):
    assert parse_ref(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ":3",
        "m:",
        "m:0",
        "m:-1",
        "m:x",
        "m:3.5",
        "m:²",
        "m:١",
        f"m:{MAX_VERSION + 1}",
        "m:" + "9" * 40,
        "m@prod",
        "m@",
        "m:3@production",
        "../m:1",
        "a/b@production",
        "m:1:2",
    ],
)
def test_bad_references_are_refused(text):
    with pytest.raises(InvalidReferenceError) as info:
        parse_ref(text)
    assert "NAME:VERSION" in (info.value.hint or "")


def test_ref_text_round_trips():
    for text in ("m:3", "m@production", "m:latest"):
        assert str(parse_ref(text)) == text


def test_stages():
    assert validate_stage("Production") == "production"
    with pytest.raises(InvalidStageError, match="'prod' is not a stage"):
        validate_stage("prod")


@pytest.mark.parametrize("tag", ["fp16", "best sts", " padded "])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag.strip()


@pytest.mark.parametrize("tag", ["", "   ", "x" * 129, "tab\there", "new\nline", 5])
def test_bad_tags(tag):
    with pytest.raises(ConfigError, match="not a valid tag"):
        validate_tag(tag)
