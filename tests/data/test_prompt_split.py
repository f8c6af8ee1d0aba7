"""The prefix is tokenized once only where that gives exactly the whole prompt's ids."""

from __future__ import annotations

import pytest

from tests.helpers import FIXTURE_ROWS, train_tokenizer
from titlegen.data.encoding import Encoder
from titlegen.data.prompt_split import SplitPrompt, template_parts
from titlegen.data.prompts import PromptTemplate

ODD_TITLES = ["12-Pack Widget", "'s Shoes", "(Hardcover)", '"Quoted" Title', "Café ™ Über", "日本語のタイトル",
              "—Dash", "#1 Best", ".hidden", "A", "", "123456789", "😀 emoji", "Привет", "x\ny", "  lead"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def _whole(enc: Encoder, titles: list[str]) -> list[list[int]]:
    return enc._whole_prompts(enc.prompt_texts(titles))


@pytest.mark.parametrize("template", [
    PromptTemplate(),  # newline before the title: the split pays
    PromptTemplate(template="Title: {title}"),  # a space BPE merges into the first word: tokenized whole
    PromptTemplate(template="{title}\nDescribe it:"),
    PromptTemplate(template="v1{title}"),  # digits group across the boundary for some titles only
])
def test_split_ids_equal_the_whole_prompt_ids(tokenizer, template):
    titles = [t for t, _ in FIXTURE_ROWS] + ODD_TITLES + [t + "23" for t in ODD_TITLES]
    enc = Encoder(tokenizer, template, max_length=64)
    for _ in range(2):  # the second pass uses the starts checked in the first
        assert enc.prompt_ids(titles) == _whole(enc, titles)


def test_the_split_is_used_where_it_holds(tokenizer):
    enc = Encoder(tokenizer, PromptTemplate(), max_length=64)
    enc.prompt_ids(ODD_TITLES)
    assert isinstance(enc._split, SplitPrompt) and enc._split.pays
    assert sum(enc._split.same.values()) >= len(ODD_TITLES) - 2  # all but starts with a newline or spaces


def test_a_tokenizer_that_prepends_a_space_still_gets_the_whole_ids(tmp_path):
    from tokenizers import pre_tokenizers

    tok = train_tokenizer(tmp_path)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    enc = Encoder(tok, PromptTemplate(), max_length=64)
    titles = [f"{chr(65 + i % 26)}{i:02d} thing" for i in range(40)]  # 40 distinct starts
    assert enc.prompt_ids(titles) == _whole(enc, titles)
    assert not enc._split.pays  # every start failed the check, so later batches skip it


def test_templates_that_do_not_hold_the_title_once_verbatim_are_tokenized_whole():
    assert template_parts(lambda t: f"A {t} B {t}") is None
    assert template_parts(lambda t: f"A {t.upper()} B") is None
    assert template_parts(lambda t: f"A\n{t}\nB") == ("A\n", "\nB")


def test_the_encoder_still_pickles_without_its_cache(tokenizer):
    import pickle

    enc = Encoder(tokenizer, PromptTemplate(), max_length=64)
    enc.prompt_ids(["Widget"])
    clone = pickle.loads(pickle.dumps(enc))
    assert clone._split is None and clone.prompt_ids(["Widget"]) == enc.prompt_ids(["Widget"])


def test_ids_from_the_rust_tokenizer_equal_the_transformers_call(tokenizer):
    enc = Encoder(tokenizer, PromptTemplate(), max_length=64)
    texts = [t for row in FIXTURE_ROWS for t in row] + ODD_TITLES
    for special in (True, False):
        assert enc.ids(texts, add_special_tokens=special) == tokenizer(texts, add_special_tokens=special)["input_ids"]


def test_a_tokenizer_that_truncates_by_itself_goes_through_transformers(tmp_path):
    tok = train_tokenizer(tmp_path)
    tok.backend_tokenizer.enable_truncation(max_length=5)  # as some tokenizer.json files ship
    texts = ["a long title with many words in it", "short"]
    assert Encoder(tok, PromptTemplate(), max_length=64).ids(texts, False) == tok(texts, add_special_tokens=False)["input_ids"]
