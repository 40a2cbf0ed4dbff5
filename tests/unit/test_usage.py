"""Token usage read from response bodies, and its cost (`domain.usage`)."""

from __future__ import annotations

import decimal
import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import usage
from fusillade.domain.usage import Cost, Pricing, Usage, cost, openai_usage, usage_in, usage_of
from fusillade.upstream import sse
from fusillade.upstream.reassemble import (
    ChatCompletionReassembler,
    CompletionReassembler,
    Reassembler,
    ResponsesReassembler,
)
from tests.support import strategies

CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 6,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT = Usage(input_tokens=19, cached_tokens=4, output_tokens=10, reasoning_tokens=6)


def chat_completion(usage_member: Any = CHAT_USAGE, content: str = "Hello! How can I help?") -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_member,
        "service_tier": "default",
        "system_fingerprint": "fp_abc",
    }


def text(document: Any) -> str:
    return orjson.dumps(document).decode()


def quick(body: str) -> Usage | str | None:
    """What the quick path alone answers ("unsure" when it leaves the body to the full parse)."""
    found = usage._usage_near_the_end(body)
    return "unsure" if found is usage._Unsure.UNSURE else found


# ---------------------------------------------------------------------------------------------- shapes


def test_a_chat_completion() -> None:
    body = text(chat_completion())
    assert usage_of(body) == CHAT
    assert quick(body) == CHAT  # read without parsing the whole body


def test_a_legacy_completion() -> None:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "\n\nThis is a test.", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    assert usage_of(text(body)) == Usage(input_tokens=5, output_tokens=7)


def test_a_responses_api_body() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 12},
            "output_tokens": 87,
            "output_tokens_details": {"reasoning_tokens": 64},
            "total_tokens": 123,
        },
        "user": None,
        "metadata": {"team": "a{b}", "n": "1"},
    }
    expected = Usage(input_tokens=36, cached_tokens=12, output_tokens=87, reasoning_tokens=64)
    assert usage_of(text(body)) == expected
    assert quick(text(body)) == expected  # flat objects after the usage keep the quick path


def test_an_embeddings_body() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert usage_of(text(body)) == Usage(input_tokens=8)
    assert usage_of(text({**body, "usage": {"prompt_tokens": 8}})) == Usage(input_tokens=8)


def test_an_output_count_that_is_missing_is_not_guessed_from_the_total() -> None:
    assert usage_of(text({"usage": {"prompt_tokens": 8, "total_tokens": 20}})) is None
    assert usage_of(text({"usage": {"input_tokens": 8, "total_tokens": 8}})) is None  # responses: both needed


def test_missing_or_null_details_count_as_zero() -> None:
    for details in ({}, None, {"cached_tokens": None}, {"audio_tokens": 3}):
        member = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": details}
        member["completion_tokens_details"] = details
        assert usage_of(text(chat_completion(member))) == Usage(input_tokens=3, output_tokens=2)


def test_the_parts_are_trusted_over_a_total_that_disagrees() -> None:
    member = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 99}
    found = usage_of(text(chat_completion(member)))
    assert found == Usage(input_tokens=3, output_tokens=2)
    assert found is not None and found.total_tokens == 5


def test_a_usage_with_both_shapes_is_read_as_chat_completions() -> None:
    member = {"prompt_tokens": 3, "completion_tokens": 2, "input_tokens": 30, "output_tokens": 20}
    assert usage_of(text({"usage": member})) == Usage(input_tokens=3, output_tokens=2)


@pytest.mark.parametrize(
    "body",
    [
        "{}",
        '{"usage": null}',
        '{"id": "x", "usage": null, "model": "m"}',
        '{"usage": {}}',
        '{"usage": {"total_tokens": 5}}',
        '{"usage": 5}',
        '{"usage": "lots"}',
        '{"usage": [19, 10]}',
        '{"usage": true}',
        "[]",
        '[{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}]',
        '"{\\"usage\\": {\\"prompt_tokens\\": 1, \\"completion_tokens\\": 1}}"',
        "null",
        "not json at all",
        "",
    ],
)
def test_no_usable_usage_is_none(body: str) -> None:
    assert usage_of(body) is None


BAD_COUNTS = [-1, 1.0, 2.5, "19", True, False, [], {}, 2**53, 10**30, float("nan")]


@pytest.mark.parametrize("count", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("where", ["input", "output", "cached", "reasoning"])
def test_a_bad_count_makes_the_usage_unknown(count: Any, where: str) -> None:
    member: dict[str, Any] = {
        "input_tokens": 10,
        "output_tokens": 10,
        "input_tokens_details": {"cached_tokens": 1},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    if where == "input":
        member["input_tokens"] = count
    elif where == "output":
        member["output_tokens"] = count
    elif where == "cached":
        member["input_tokens_details"]["cached_tokens"] = count
    else:
        member["output_tokens_details"]["reasoning_tokens"] = count
    body = json.dumps({"object": "response", "usage": member})  # json writes NaN, as a sloppy upstream could
    assert usage_of(body) is None
    assert usage_in(json.loads(body)) is None


def test_the_largest_count_is_accepted() -> None:
    member = {"prompt_tokens": usage.MAX_COUNT, "completion_tokens": 0}
    assert usage_of(text({"usage": member})) == Usage(input_tokens=usage.MAX_COUNT)


@pytest.mark.parametrize("details", [5, "x", [1], True])
def test_details_that_are_not_objects_make_the_usage_unknown(details: Any) -> None:
    member = {"prompt_tokens": 3, "completion_tokens": 2, "completion_tokens_details": details}
    assert usage_of(text(chat_completion(member))) is None


def test_parts_that_contradict_each_other_make_the_usage_unknown() -> None:
    more_cached = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
    more_reasoning = {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    assert usage_of(text(chat_completion(more_cached))) is None
    assert usage_of(text(chat_completion(more_reasoning))) is None
    all_cached = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}}
    assert usage_of(text(chat_completion(all_cached))) == Usage(input_tokens=3, cached_tokens=3, output_tokens=2)


def test_usage_in_reads_a_parsed_body() -> None:
    assert usage_in(chat_completion()) == CHAT
    assert usage_in([chat_completion()]) is None
    assert usage_in("usage") is None


# ------------------------------------------------------------------------------------- streamed bodies


def events(*documents: Any) -> list[sse.Event]:
    return [sse.Event(orjson.dumps(document).decode()) for document in documents]


def chunk(choices: list[Any], **rest: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700,
        "model": "m",
        "choices": choices,
        **rest,
    }


def reassembled(reassembler: Reassembler, stream: list[sse.Event]) -> str:
    for event in stream:
        reassembler.add(event)
    return reassembler.finish().decode()


def test_a_streamed_chat_completion_with_a_usage_chunk() -> None:
    stream = events(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]),
        chunk([], usage=CHAT_USAGE),
    )
    body = reassembled(ChatCompletionReassembler(), [*stream, sse.Event(sse.DONE)])
    assert usage_of(body) == CHAT
    assert quick(body) == CHAT


def test_a_streamed_chat_completion_without_a_usage_chunk_is_unknown() -> None:
    stream = events(chunk([{"index": 0, "delta": {"content": '"usage": {"prompt_tokens": 1}'}}]))
    body = reassembled(ChatCompletionReassembler(), [*stream, sse.Event(sse.DONE)])
    assert '"usage":null' in body
    assert usage_of(body) is None
    assert quick(body) is None  # known without the full parse (llama.cpp's streams all look like this)


def test_a_streamed_completion() -> None:
    stream = events(
        {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "Hi", "finish_reason": "stop"}]},
        {
            "id": "c",
            "object": "text_completion",
            "choices": [],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        },
    )
    body = reassembled(CompletionReassembler(), [*stream, sse.Event(sse.DONE)])
    assert usage_of(body) == Usage(input_tokens=2, output_tokens=1)


def test_a_streamed_response() -> None:
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "usage": {"input_tokens": 5, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4}},
        "metadata": {},
    }
    stream = [
        sse.Event(text({"type": "response.output_text.delta", "delta": "Hi"}), event="response.output_text.delta"),
        sse.Event(text({"type": "response.completed", "response": response}), event="response.completed"),
    ]
    body = reassembled(ResponsesReassembler(), stream)
    assert usage_of(body) == Usage(input_tokens=5, output_tokens=9, reasoning_tokens=4)


# ------------------------------------------------------------------------------------------ adversarial

FAKE = {"prompt_tokens": 1000, "completion_tokens": 1000}


@pytest.mark.parametrize(
    "body",
    [
        # a "usage" inside message content, after the real one
        text({"usage": CHAT_USAGE, "note": '{"usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}'}),
        text({"usage": CHAT_USAGE, "note": 'say "usage'}),
        text({"usage": CHAT_USAGE, 'a key ending in "usage': FAKE}),
        text({"usage": CHAT_USAGE, "note": "usage"}),
        text({"usage": CHAT_USAGE, "x": 1, "last": '"usage"'}),
        # in a nested object, after the real one
        text({"usage": CHAT_USAGE, "debug": {"usage": FAKE}}),
        text({"usage": CHAT_USAGE, "debug": [{"usage": FAKE}]}),
        text({"usage": CHAT_USAGE, "debug": {"upstream": {"usage": FAKE}, "more": [1, {"a": "}"}]}}),
        # a key spelled with escapes, after the plain one: the reader keeps the last member of a name
        text({"usage": FAKE})[:-1] + ',"us\\u0061ge":' + text(CHAT_USAGE) + "}",
        # unicode and whitespace
        json.dumps({"content": 'héllo ☃ \U0001f600 "usage" \\', "usage": CHAT_USAGE}, ensure_ascii=False),
        json.dumps({"content": "héllo ☃ \U0001f600", "usage": CHAT_USAGE, "tail": "é"}, ensure_ascii=True),
        json.dumps({"usage": CHAT_USAGE, "model": "m"}, indent=4),
        json.dumps({"usage": CHAT_USAGE, "model": "m"}, separators=(" , ", " : ")),
        '\r\n\t {\r\n\t "usage"\r\n\t :\r\n\t ' + text(CHAT_USAGE) + "\r\n\t }\r\n\t ",
        # the usage member written twice: the last one counts
        text({"usage": FAKE})[:-1] + ',"usage":' + text(CHAT_USAGE) + "}",
        # a usage nested deeper than two levels, or holding strings with braces and escapes
        text({"usage": {**CHAT_USAGE, "extra": {"deep": {"deeper": 1}}}}),
        text({"usage": {**CHAT_USAGE, "note": "a } b { c"}}),
        text({"usage": {**CHAT_USAGE, "note": 'a \\"}'}}),
    ],
)
def test_the_usage_read_is_the_one_a_full_parse_reads(body: str) -> None:
    assert usage_in(json.loads(body)) == CHAT  # the test's own premise
    assert usage_of(body) == CHAT
    assert quick(body) in ("unsure", CHAT)


@pytest.mark.parametrize(
    "body",
    [
        text({"content": "x", "debug": {"usage": FAKE}}),  # only nested
        text({"debug": {"usage": FAKE}, "usage": None}),
        text({"content": text({"usage": FAKE})}),  # only inside a string
        text({"content": 'the "usage'}),
        text({'the "usage': FAKE}),  # a key that ends with `"usage`
        text({"usage": FAKE})[:-1] + ',"us\\u0061ge":null}',  # the last one, spelled with escapes, is null
        text({"us\u0430ge": FAKE}),  # a Cyrillic a: another key
        text({"Usage": FAKE}),
        text({"usage ": FAKE}),
    ],
)
def test_a_usage_that_a_full_parse_does_not_read_is_not_read(body: str) -> None:
    assert usage_in(json.loads(body)) is None
    assert usage_of(body) is None


def test_the_quick_path_leaves_to_the_full_parse_what_it_cannot_be_sure_of() -> None:
    assert quick(text({"usage": CHAT_USAGE, "debug": {"usage": FAKE}})) == "unsure"
    assert quick(text({"usage": CHAT_USAGE, "note": 'say "usage'})) == "unsure"
    assert quick(text({'say "usage': FAKE})) == "unsure"
    assert quick(text({"usage": CHAT_USAGE, "tail": {"nested": {"a": 1}}})) == "unsure"
    assert quick(text({"usage": FAKE})[:-1] + ',"us\\u0061ge":' + text(CHAT_USAGE) + "}") == "unsure"
    assert quick('{"note": "caf\\u00e9"}') == "unsure"
    assert quick('{"note": "cafe"}') is None  # no usage key can hide in a text without `"usage"` or `\u`


def test_a_large_body_is_read_quickly_and_right() -> None:
    body = text(chat_completion(content='Lorem "usage": {} ipsum é\n' * 800))
    assert len(body) > 20_000
    assert quick(body) == CHAT
    assert usage_of(body) == CHAT


# ---------------------------------------------------------------------------------------------- property

usage_members = st.one_of(
    st.fixed_dictionaries(
        {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
        optional={
            "total_tokens": st.integers(0, 10**6),
            "prompt_tokens_details": st.none() | st.fixed_dictionaries({"cached_tokens": st.integers(0, 10)}),
            "completion_tokens_details": st.fixed_dictionaries({"reasoning_tokens": st.integers(-1, 10)}),
        },
    ),
    st.fixed_dictionaries(
        {"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6) | st.booleans()},
        optional={"input_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 10)})},
    ),
    st.none() | strategies.json_values(max_leaves=4),
)
TRICKY_TEXTS = ["usage", '"usage', 'x "usage', "us\\age", "}", "]", "{", '{"usage": {"prompt_tokens": 7}}', "\\"]
"""Strings that look like JSON syntax once written: quotes, backslashes and brackets around `usage`."""
keys = st.text(max_size=8) | st.sampled_from(TRICKY_TEXTS)
json_values = st.one_of(
    strategies.json_scalars, st.sampled_from(TRICKY_TEXTS), strategies.json_values(max_leaves=8)
)


@st.composite
def documents(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """The members of an object, with usage members at random places: at the top (perhaps twice), in nested
    objects, in strings."""
    members = list(draw(st.dictionaries(keys, json_values, max_size=5)).items())
    for _ in range(draw(st.integers(0, 3))):
        member = draw(usage_members)
        place = draw(st.sampled_from(["top", "top", "top", "nested", "list", "string"]))
        value: Any = {
            "top": member,
            "nested": {"usage": member, "x": draw(json_values)},
            "list": [{"usage": member}],
            "string": text({"usage": member}),
        }[place]
        key = "usage" if place == "top" else draw(keys)
        members.insert(draw(st.integers(0, len(members))), (key, value))
    return members


STYLES: dict[str, dict[str, Any]] = {
    "compact": {"separators": (",", ":"), "ensure_ascii": False},
    "spaced": {"separators": (", ", ": "), "ensure_ascii": False},
    "indented": {"indent": 2, "ensure_ascii": False},
    "ascii": {"separators": (", ", ": "), "ensure_ascii": True},
}


@st.composite
def writings(draw: st.DrawFn, members: list[tuple[str, Any]]) -> str:
    """An object of `members` as JSON text (a key may be written twice) in one of the styles upstreams use,
    with some of its `"usage"` written `"us\\u0061ge"` (which reads the same)."""
    style = STYLES[draw(st.sampled_from(sorted(STYLES)))]
    written = [json.dumps(key, **style) + ": " + json.dumps(value, **style) for key, value in members]
    body = "{" + draw(st.sampled_from([",", ",\n  ", " , "])).join(written) + draw(st.sampled_from(["}", "\n}\n"]))
    if not draw(st.booleans()):
        return body
    pieces = body.split('"usage"')
    spellings = draw(st.lists(st.sampled_from(['"usage"', '"us\\u0061ge"']), min_size=len(pieces) - 1))
    return pieces[0] + "".join(spelling + piece for spelling, piece in zip(spellings, pieces[1:], strict=False))


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_usage_of_reads_what_a_full_parse_reads(data: st.DataObject) -> None:
    body = data.draw(writings(data.draw(documents())))
    expected = usage_in(json.loads(body))
    assert usage_of(body) == expected
    assert quick(body) in ("unsure", expected)


# -------------------------------------------------------------------------------------------- sums, shape


def test_usages_add_up() -> None:
    first = Usage(input_tokens=10, cached_tokens=2, output_tokens=5, reasoning_tokens=1)
    second = Usage(input_tokens=1, cached_tokens=1, output_tokens=7, reasoning_tokens=3)
    assert first + second == Usage(input_tokens=11, cached_tokens=3, output_tokens=12, reasoning_tokens=4)
    assert sum([first, second, first], usage.ZERO) == Usage(21, 5, 17, 5)
    assert sum([], usage.ZERO) == Usage(0, 0, 0, 0)
    assert (first + second).total_tokens == 23


def test_a_usage_cannot_be_changed() -> None:
    with pytest.raises(AttributeError):
        CHAT.input_tokens = 1  # type: ignore[misc]


def test_openai_usage_is_the_batch_object_shape() -> None:
    assert openai_usage(CHAT) == {
        "input_tokens": 19,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 6},
        "total_tokens": 29,
    }
    assert openai_usage(usage.ZERO)["total_tokens"] == 0


# ---------------------------------------------------------------------------------------------------- cost


def test_cost_prices_cached_input_apart_and_reasoning_once() -> None:
    pricing = Pricing.per_million(input="2.50", cached_input="1.25", output="10.00")
    spent = cost(Usage(input_tokens=1_000, cached_tokens=400, output_tokens=300, reasoning_tokens=200), pricing)
    # 600 x 2.50 + 400 x 1.25 = 2,000 per million; 300 x 10 = 3,000 per million (reasoning inside the 300)
    assert spent.input == Decimal("0.002")
    assert spent.output == Decimal("0.003")
    assert spent.total == Decimal("0.005")


def test_cost_is_exact_to_fractions_of_a_cent() -> None:
    pricing = Pricing.per_million(input="0.15", cached_input="0.075", output="0.60")
    spent = cost(Usage(input_tokens=123_457, cached_tokens=1_001, output_tokens=7), pricing)
    assert spent.input == Decimal("0.018443475")  # 122,456 x 0.15 + 1,001 x 0.075 = 18,443.475 per million
    assert spent.output == Decimal("0.0000042")  # 7 x 0.60 = 4.2 per million
    assert spent.total == Decimal("0.018447675")
    one_token = cost(Usage(input_tokens=1), Pricing.per_million(input="0.000001", output=0))
    assert one_token.total == Decimal("1E-12")


def test_cost_of_a_huge_usage_stays_exact() -> None:
    price = Decimal("3.333333333333333333333333333333")
    spent = cost(
        Usage(input_tokens=usage.MAX_COUNT, output_tokens=usage.MAX_COUNT),
        Pricing.per_million(input=price, output=1),
    )
    with decimal.localcontext() as exact:
        exact.prec = 100  # the default 28 digits would round the expected value itself
        assert spent.input == Decimal(usage.MAX_COUNT) * price / 10**6
    assert len(spent.input.as_tuple().digits) == 16 + 31  # every digit kept, none rounded away
    assert spent.output == Decimal("9007199254.740991")


def test_cached_input_is_priced_as_input_when_not_configured() -> None:
    pricing = Pricing.per_million(input=2, output=8)
    assert pricing.cached_input == Decimal(2)
    assert cost(Usage(input_tokens=10, cached_tokens=10), pricing) == cost(Usage(input_tokens=10), pricing)


def test_prices_are_read_as_written() -> None:
    assert Pricing.per_million(input=0.15, output=0.6) == Pricing(Decimal("0.15"), Decimal("0.15"), Decimal("0.6"))
    assert Pricing.per_million(input=Decimal("1.1"), output="0", cached_input=1).cached_input == Decimal(1)


@pytest.mark.parametrize("price", [-1, "-0.01", "abc", float("nan"), float("inf"), "Infinity", True])
def test_bad_prices_are_refused(price: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        Pricing.per_million(input=price, output=1)
    with pytest.raises((ValueError, TypeError)):
        Pricing.per_million(input=1, output=1, cached_input=price)


def test_a_pricing_holds_decimals() -> None:
    with pytest.raises(TypeError):
        Pricing(input=1, cached_input=Decimal(1), output=Decimal(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pricing(input=Decimal(-1), cached_input=Decimal(1), output=Decimal(1))


def test_costs_add_up() -> None:
    pricing = Pricing.per_million(input="1.5", output="4")
    first, second = cost(Usage(input_tokens=1), pricing), cost(Usage(output_tokens=3), pricing)
    assert first + second == Cost(input=Decimal("0.0000015"), output=Decimal("0.000012"))
    assert sum([first, second], usage.NO_COST) == first + second
    assert (first + second).total == Decimal("0.0000135")


def test_a_usage_with_more_cached_than_input_tokens_has_no_cost() -> None:
    with pytest.raises(ValueError):
        cost(Usage(input_tokens=1, cached_tokens=2), Pricing.per_million(input=1, output=1))
