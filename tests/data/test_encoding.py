import pytest
import torch

from titlegen.data.encoding import IGNORE_INDEX, Encoder, collate_prompts, collate_train, join_prompt_response
from titlegen.data.prompts import PromptTemplate, load_prompt, save_prompt
from titlegen.errors import TitlegenError


class MockTokenizer:
    """Whitespace tokenizer with fixed ids: <pad>=0, <s>=1, </s>=2, then words in order of first sight."""

    bos_token, eos_token = "<s>", "</s>"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self) -> None:
        self.vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([1] if add_special_tokens else []) + self._ids(t) for t in texts]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        body = " ".join(f"[{m['role']}] {m['content']}" for m in messages)
        return f"<s> {body} [assistant]" if add_generation_prompt else f"<s> {body}"


def test_join_masks_prompt_and_ends_with_eos():
    enc = join_prompt_response([1, 5, 6], [7, 8, 9], eos_id=2, max_length=10)
    assert enc.input_ids == [1, 5, 6, 7, 8, 9, 2]
    assert enc.labels == [IGNORE_INDEX] * 3 + [7, 8, 9, 2]


def test_truncation_cuts_the_response_but_keeps_eos():
    enc = join_prompt_response([1, 5, 6], [7, 8, 9, 10, 11], eos_id=2, max_length=6)
    assert enc.input_ids == [1, 5, 6, 7, 8, 2]
    assert enc.labels == [IGNORE_INDEX] * 3 + [7, 8, 2]
    assert join_prompt_response([1, 5, 6, 7, 8], [9], eos_id=2, max_length=6) is None  # no room for a token


def test_encoder_exact_ids_and_labels():
    tok = MockTokenizer()
    enc = Encoder(tok, PromptTemplate(template="Title: {title} Answer:"), max_length=64)
    [ex] = enc.encode(["Blue Pen"], ["A smooth blue pen."])
    # <s> Title: Blue Pen Answer: | A smooth blue pen. </s>
    assert ex.input_ids == [1, 3, 4, 5, 6, 7, 8, 9, 10, 2]
    assert ex.labels == [IGNORE_INDEX] * 5 + [7, 8, 9, 10, 2]


def test_chat_prompt_has_a_single_bos():
    tok = MockTokenizer()
    enc = Encoder(tok, PromptTemplate(template="Describe: {title}", chat=True, system="Be brief."), max_length=64)
    [ids] = enc.prompt_ids(["Mug"])
    assert ids[0] == 1 and ids.count(1) == 1
    assert enc.prompt_texts(["Mug"])[0] == "<s> [system] Be brief. [user] Describe: Mug [assistant]"


def test_collate_train_pads_right_with_ignore_labels():
    batch = collate_train([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2]},
                           {"input_ids": [1, 6, 7, 8, 2], "labels": [-100, -100, 7, 8, 2]}], pad_id=0,
                          pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[1, 5, 2, 0, 0, 0, 0, 0], [1, 6, 7, 8, 2, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 2] + [-100] * 5, [-100, -100, 7, 8, 2] + [-100] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]


def test_padding_equal_to_eos_keeps_the_real_eos_in_labels():
    """pad == eos must not mask the EOS the model has to learn (the 'never stops' bug)."""
    batch = collate_train([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2]},
                           {"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}], pad_id=2)
    assert batch["labels"][0].tolist() == [-100, 5, 2, -100]
    assert batch["input_ids"][0].tolist() == [1, 5, 2, 2]


def test_collate_prompts_pads_left():
    batch = collate_prompts([[1, 5], [1, 6, 7, 8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5], [1, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_prompt_round_trip(tmp_path):
    prompt = PromptTemplate(template="Décris « {title} » :\n", chat=True, system="Réponds {brièvement}.")
    save_prompt(prompt, tmp_path)
    assert load_prompt(tmp_path) == prompt
    assert prompt.render("Tasse {x}") == "Décris « Tasse {x} » :\n"  # braces in titles stay literal


def test_prompt_errors(tmp_path):
    with pytest.raises(TitlegenError, match=r"\{title\}"):
        PromptTemplate(template="no placeholder")
    with pytest.raises(TitlegenError, match="prompt.yaml: missing"):
        load_prompt(tmp_path)
    (tmp_path / "prompt.yaml").write_text("template: 'x {title}'\ncolour: red\n")
    with pytest.raises(TitlegenError, match="unknown key"):
        load_prompt(tmp_path)


def test_first_hour_09_a_huge_description_is_cut_before_tokenizing():
    """A 50 MB line once peaked at 7 GB RSS: only the text that can be kept reaches the tokenizer."""
    seen: list[int] = []

    class Spy(MockTokenizer):
        def __call__(self, texts, add_special_tokens=True):
            seen.extend(len(t) for t in texts)
            return super().__call__(texts, add_special_tokens)

    enc = Encoder(Spy(), PromptTemplate(template="Title: {title} Answer:"), max_length=16)
    huge = " ".join(f"w{i % 50}" for i in range(2_000_000))  # ~8 MB
    [ex] = enc.encode(["Blue Pen"], [huge])
    assert max(seen) <= 16 * 64
    [full] = Encoder(MockTokenizer(), PromptTemplate(template="Title: {title} Answer:"), max_length=16).encode(
        ["Blue Pen"], [" ".join(f"w{i % 50}" for i in range(40))])
    assert ex.input_ids == full.input_ids and ex.labels == full.labels  # the kept ids are the same
