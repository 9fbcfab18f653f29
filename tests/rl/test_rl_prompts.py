"""Prompt rows in verl's layout and the one tokenization every prompt reader uses."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miniray.rl.models.tiny import char_tokenizer
from miniray.rl.prompts import load_prompts, prompt_text, prompt_token_ids, row_extra_info

# Renders only characters the tiny tokenizer knows; the trailing '=' marks the generation prompt.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = char_tokenizer("0123456789+-=")
    tok.chat_template = TEMPLATE
    return tok


def verl_rows():
    return [
        {
            "data_source": "arithmetic",
            "prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"}],
            "reward_model": {"ground_truth": "3", "style": "rule"},
            "extra_info": {"split": "train", "index": 0},
        },
        {
            "data_source": "arithmetic",
            "prompt": [{"role": "user", "content": "4+4"}],
            "reward_model": {"ground_truth": "8", "style": "rule"},
            "extra_info": None,
        },
    ]


def test_verl_parquet_rows_load_with_chat_prompts_answers_and_extra_info(tmp_path, tokenizer):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows()), path)
    rows = load_prompts(path)
    assert [r["ground_truth"] for r in rows] == ["3", "8"]
    assert row_extra_info(rows[0]) == {"split": "train", "index": 0}
    assert row_extra_info(rows[1]) == {}
    assert [prompt_text(tokenizer, r["prompt"]) for r in rows] == ["<s>1+2=", "<s>4+4="]


def test_chat_prompts_go_through_the_template_with_the_generation_prompt(tokenizer):
    chat = [{"role": "user", "content": "1+2"}]
    (ids,) = prompt_token_ids(tokenizer, [chat])
    assert tokenizer.decode(ids) == "<s>1+2="  # '=' comes from add_generation_prompt
    # The same prompt as text gets BOS added here, and the two agree token for token.
    assert prompt_token_ids(tokenizer, ["1+2=", chat]) == [ids, ids]


def test_text_prompts_get_bos_and_no_other_special_tokens():
    tok = char_tokenizer("0123456789+=")
    (ids,) = prompt_token_ids(tok, ["1+2="])
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "1+2="


def test_a_chat_prompt_without_a_template_says_what_to_do():
    tok = char_tokenizer("0123456789+=")
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_token_ids(tok, [[{"role": "user", "content": "1"}]])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "non-empty list of chat messages"),
        (7, "holds int"),
        ([{"role": "user"}], "message 0"),
        ([{"role": "user", "content": "1"}, "hi"], "message 1"),
    ],
)
def test_a_malformed_prompt_names_the_file_the_row_and_the_column(tmp_path, prompt, message):
    path = tmp_path / "bad.jsonl"
    rows = [{"question": "1+1=", "ground_truth": "2"}, {"question": prompt, "ground_truth": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path, prompt_key="question")
    assert f"{path}: row 1, column 'question'" in str(info.value)


def test_a_row_without_the_prompt_column_names_the_columns_it_has(tmp_path):
    path = tmp_path / "noprompt.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 lacks the column 'question'.*'prompt'"):
        load_prompts(path, prompt_key="question")


def test_a_row_without_an_answer_names_the_columns_it_has(tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "data_source": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 lacks the column 'answer'.*\['data_source'"):
        load_prompts(path, answer_key="answer")
