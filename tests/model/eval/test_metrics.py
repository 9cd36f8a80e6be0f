import math

import pytest

from model.eval.answers import exact_match, normalize_answer
from model.eval.mcq import extract_option_letter, mcq_accuracy, option_letter_from_text, parse_choices
from model.eval.metrics import (
    aggregate,
    higher_is_better,
    per_example_scores,
    score_task,
    task_kind,
    worst_examples,
)
from model.eval.speech import bleu, cer, normalize_transcript, wer

PROMPT = "<image>What color is the shape? A. red B. blue C. green D. dark red\nAnswer with the letter."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bare letters
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("  [c]  ", "C"),
        ("（Ｂ）", "B"),  # full-width
        ("**D**", "D"),  # markdown
        # explicit statements
        ("The answer is (B)", "B"),
        ("答案是B", "B"),
        ("答案：C", "C"),
        ("正确答案是D。", "D"),
        ("我选B", "B"),
        ("Answer: C) blue", "C"),
        ("**Answer:** D", "D"),
        ("answer: b", "B"),
        ("Final answer: (d)", "D"),
        ("The correct option is A.", "A"),
        ("A is correct", "A"),
        ("选项B正确，选项A错误", "B"),
        ("Option A is wrong. Option B is correct.", "B"),
        ("I think the answer is A, but actually the answer is C.", "C"),
        ("A red circle, so the answer is B", "B"),
        # leading letter with trailing reasoning; a letter alone on a line
        ("B. Because the circle is bigger than A.", "B"),
        ("B because the sky is blue", "B"),
        ("C\nThe square (A) is smaller.", "C"),
        ("Let me think.\nC\nBecause A is too small", "C"),
        # a single letter somewhere
        ("The image shows a red circle. (A)", "A"),
        ("I think it is C", "C"),
        ("It is not A, it is B", "B"),
        # nothing or several
        ("A red circle", None),
        ("a red circle", None),
        ("The answer is a red circle", None),
        ("", None),
        ("I don't know", None),
        ("The shape is red.", None),
        ("Both A and B", None),
        ("A or B", None),
        ("The answer is B or C", None),
        ("A. red\nB. green\nC. blue", None),  # echoing the options
        ("The answer is E", None),  # not an option
        ("(A) or (C)", None),
    ],
)
def test_extract_option_letter(text, expected):
    assert extract_option_letter(text) == expected


def test_extract_option_letter_respects_options():
    assert extract_option_letter("The answer is E", options="ABCDE") == "E"
    assert extract_option_letter("E") is None
    # "I" is a pronoun unless it is clearly the answer
    assert extract_option_letter("I think F", options="ABCDEFGHIJ") == "F"
    assert extract_option_letter("The answer is I", options="ABCDEFGHIJ") == "I"


def test_parse_choices_inline_lines_and_brackets():
    assert parse_choices(PROMPT) == {"A": "red", "B": "blue", "C": "green", "D": "dark red"}
    assert parse_choices("Which animal?\n(A) cat\n(B) dog\n(C) bird") == {"A": "cat", "B": "dog", "C": "bird"}
    # an abbreviation before the options does not start a run
    q = "How many stars on the U.S.A. flag?\nA. 13\nB. 50\nC. fifty-one"
    assert parse_choices(q) == {"A": "13", "B": "50", "C": "fifty-one"}
    assert parse_choices("小猫是什么颜色？\nA、黑色\nB、白色") == {"A": "黑色", "B": "白色"}
    assert parse_choices("What is 2 + 2?") == {}


def test_option_letter_from_text():
    choices = parse_choices(PROMPT)
    assert option_letter_from_text("Red", choices) == "A"
    assert option_letter_from_text("It is dark red.", choices) == "D"  # longer option wins over "red"
    assert option_letter_from_text("red or blue", choices) is None
    assert option_letter_from_text("purple", choices) is None
    assert option_letter_from_text("There are three.", {"A": "2", "B": "3"}) == "B"


def test_mcq_accuracy_uses_prompt_for_text_fallback():
    preds = ["The answer is (B)", "A red shape", "C", "dark red"]
    refs = ["B", "A", "B", "D"]
    assert mcq_accuracy(preds, refs) == 0.25  # without options text, only the first counts
    assert mcq_accuracy(preds, refs, [PROMPT] * 4) == 0.75
    # a key beyond D widens the valid letters
    assert mcq_accuracy(["E"], ["E"]) == 1.0


def test_normalize_answer_and_exact_match():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("1,000.5") == "1000.5"
    assert normalize_answer("Don't.") == "dont"
    assert normalize_answer("红色。") == "红色"
    assert exact_match("Three.", "3") == 1.0
    assert exact_match("a circle", "the circle") == 1.0
    assert exact_match("circles", "circle") == 0.0
    assert exact_match("blue", ["red", "Blue"]) == 1.0


def test_wer_cer_known_values():
    assert wer(["the cat sat down"], ["the cat sat up"]) == pytest.approx(0.25)
    # normalisation: case and punctuation do not count
    assert wer(["Hello, world!"], ["hello world"]) == 0.0
    assert normalize_transcript("Hi [noise] there (laughs), DON'T!") == "hi there dont"
    # corpus WER pools the words: 1 substitution + 1 insertion over 5 reference words
    assert wer(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(0.4)
    assert wer(["one two"], [""]) == 1.0
    assert cer(["abcd"], ["abed"]) == pytest.approx(0.25)
    # spaces next to Chinese characters are not characters to score
    assert cer(["你好 世界"], ["你好时间"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])


def test_bleu_chinese_tokenizer():
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    # with the default 13a tokenizer an unspaced Chinese sentence is one token; "zh" splits characters
    refs, hyps = ["我喜欢这只小猫"], ["我喜欢那只小猫"]
    assert bleu(refs, hyps, tokenize="13a") == 0.0
    assert bleu(refs, hyps) == pytest.approx(bleu(refs, hyps, tokenize="zh"))
    assert bleu(refs, hyps) > 0.0


def test_task_dispatch():
    assert [task_kind(t) for t in ["image_mcq", "asr", "asr_zh", "s2tt_en_zh", "caption", "text_qa"]] == [
        "mcq",
        "asr",
        "asr",
        "s2tt",
        "open",
        "open",
    ]
    assert score_task("video_mcq", ["(B)", "A"], ["B", "C"]) == {"mcq_accuracy": 0.5}
    asr = score_task("asr", ["the cat sat up"], ["The cat sat down."])
    assert asr["wer"] == pytest.approx(0.25) and set(asr) == {"wer", "cer"}
    assert score_task("caption", ["A red circle."], ["red circle"]) == {"vqa_accuracy": 1.0}
    assert score_task("text_qa", ["Two"], ["3"]) == {"vqa_accuracy": 0.0}
    assert set(score_task("s2tt", ["hello"], ["hello"])) == {"bleu"}


def test_per_example_scores_and_worst_examples():
    assert per_example_scores("image_mcq", ["B", "nope"], ["B", "A"]) == [1.0, 0.0]
    assert per_example_scores("asr", ["a b c d", "x"], ["a b c e", "x"]) == [0.25, 0.0]
    worst = worst_examples("asr", ["x", "a b c d", "q"], ["x", "a b c e", "z"], k=2)
    assert [w["score"] for w in worst] == [1.0, 0.25]  # highest WER first
    assert set(worst[0]) == {"task", "prompt", "prediction", "reference", "score"}
    worst = worst_examples("text_qa", ["2", "blue"], ["two", "red"], prompts=["q1", "q2"], k=1)
    assert worst[0]["prompt"] == "q2" and worst[0]["score"] == 0.0


def test_aggregate_weights_by_count():
    results = {
        "image_mcq": {"mcq_accuracy": 1.0},
        "video_mcq": {"mcq_accuracy": 0.0},
        "asr": {"wer": 0.2, "cer": 0.1},
        "text_qa": {"vqa_accuracy": 0.5},
    }
    overall = aggregate(results, {"image_mcq": 3, "video_mcq": 1, "asr": 5, "text_qa": 2})
    assert overall == pytest.approx({"mcq_accuracy": 0.75, "wer": 0.2, "cer": 0.1, "vqa_accuracy": 0.5})
    assert aggregate(results)["mcq_accuracy"] == 0.5  # equal weights
    with pytest.raises(KeyError):
        aggregate(results, {"image_mcq": 1})


def test_metric_direction():
    assert not higher_is_better("wer") and not higher_is_better("asr/cer")
    assert higher_is_better("mcq_accuracy") and higher_is_better("bleu")
    assert not math.isnan(wer(["a"], ["a"]))
