"""`fusillade run --model-route MODEL=URL[,URL...][,concurrency=N][,key-env=VAR][,stream]`, parsed."""

from __future__ import annotations

import pytest

from fusillade.cli.run import parse_model_route


def test_one_url_is_a_single_upstream() -> None:
    model, section = parse_model_route("llama=http://127.0.0.1:8000,concurrency=32,stream")
    assert model == "llama"
    assert (section.base_url, section.concurrency, section.stream) == ("http://127.0.0.1:8000", 32, True)


def test_several_urls_are_a_pool_of_endpoints() -> None:
    model, section = parse_model_route("llama=http://a:8000,http://b:8000/v1,concurrency=8,key-env=POOL_KEY")
    assert model == "llama"
    assert section.base_urls == ("http://a:8000", "http://b:8000/v1")
    assert (section.concurrency, section.api_key_env) == (8, "POOL_KEY")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("llama=http://a:8000,http://a:8000", "URL: lists 'http://a:8000' twice"),
        ("llama=http://a:8000,http://b:99999", "URL: endpoint 2 of the list: 'http://b:99999' is not a valid URL"),
        ("llama=http://a:8000,b:8000", "unknown setting 'b:8000'"),
    ],
)
def test_a_bad_pool_is_explained(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_route(text)
