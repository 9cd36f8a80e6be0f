import math

import pytest

from model.eval.answers import (
    anls,
    exact_match,
    normalize_answer,
    ocrbench_match,
    relaxed_correct,
    vqa_accuracy,
    vqa_normalize,
)
from model.eval.items import ScoreRow
from model.eval.mcq import (
    extract_option_letter,
    gold_letter,
    mcq_accuracy,
    option_letter_from_text,
    parse_choices,
    pick_option,
    rotations,
)
from model.eval.metrics import aggregate, higher_is_better, item_score, score_rows
from model.eval.speech import bleu, cer, corpus_bleu, normalize_transcript, wer

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


# The cases below are worked by hand from the peers' published formulas; each test names its source.


def test_vqa_accuracy_over_ten_answers():
    """lmms-eval tasks/textvqa/utils.py (textvqa_process_results) = the official VQA eval: for each of
    the 10 human answers, min(1, matches among the other 9 / 3), averaged."""
    def answers(k: int) -> list[str]:
        return ["red"] * k + ["blue"] * (10 - k)

    # k matching humans: k of the 10 terms see k-1 matches, 10-k see k -> (k*min(1,(k-1)/3) + (10-k)*min(1,k/3))/10
    assert vqa_accuracy("red", answers(0)) == 0.0
    assert vqa_accuracy("red", answers(1)) == pytest.approx(0.3)  # 9 * (1/3) / 10
    assert vqa_accuracy("red", answers(2)) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("red", answers(3)) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("red", answers(4)) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


@pytest.mark.parametrize(("prediction", "answer"), [
    # EvalAI's processing (lmms-eval _task_utils/vqa_eval_metric.py EvalAIAnswerProcessor)
    ("Two", "2"),  # number words zero-ten as digits
    ("The dog", "dog"),  # articles dropped
    ("dont", "don't"),  # contractions restored
    ("hot-dog", "hot dog"),  # a hyphen inside a word becomes a space
    ("Yes.", "yes"),  # a final period goes
    ("3.5", "3.5"),  # a decimal point stays
    ("1,000", "1000"),  # commas go
    ("what?", "what"),
])
def test_evalai_normalisation_matches(prediction, answer):
    assert vqa_normalize(prediction) == vqa_normalize(answer)
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


def test_evalai_normalisation_keeps_real_differences():
    assert vqa_normalize("3.5") != vqa_normalize("35")
    assert vqa_normalize("dogs") != vqa_normalize("dog")
    assert vqa_normalize("eleven") == "eleven"  # only zero-ten are mapped


def test_anls():
    """lmms-eval api/metrics.py anls (= the DocVQA / ST-VQA script): 1 - Levenshtein / max length on
    lowercased, space-collapsed text; best over the answers; 0 below the 0.5 threshold."""
    assert anls("Annual Report", ["annual report"]) == 1.0
    assert anls("Annual Reprt", ["Annual Report"]) == pytest.approx(1 - 1 / 13)
    assert anls("abef", ["abcd"]) == 0.5  # exactly the threshold: kept
    assert anls("abxyz", ["abcde"]) == 0.0  # 1 - 3/5 = 0.4 < 0.5
    assert anls("report 2019", ["Annual Report", "report 2019"]) == 1.0  # best answer
    assert anls("", ["x"]) == 0.0


def test_relaxed_accuracy():
    """lmms-eval tasks/chartqa/utils.py relaxed_correctness (Methani et al. 2020, ChartQA section 5.1):
    within 5% of a non-zero numeric key, '%' read as /100, else exact ignoring case."""
    assert relaxed_correct("10.4", "10") and relaxed_correct("9.5", "10")
    assert not relaxed_correct("10.6", "10")
    assert relaxed_correct("12%", "0.12") and not relaxed_correct("12", "0.12")
    assert relaxed_correct("0", "0") and not relaxed_correct("0.01", "0")  # a zero key: exact only
    assert relaxed_correct("Yes", "yes") and not relaxed_correct("yes, it is", "yes")


def test_ocrbench_containment():
    """lmms-eval tasks/ocrbench/utils.py ocrbench_process_results: a key contained in the lowercased
    answer; the handwritten-formula subset (HME100k) compares without spaces."""
    assert ocrbench_match("The word is STOP.", ["stop"]) == 1.0
    assert ocrbench_match("STO", ["stop"]) == 0.0
    assert ocrbench_match("x^{2}", ["x ^ { 2 }"], compact=True) == 1.0
    assert ocrbench_match("x^{2}", ["x ^ { 2 }"]) == 0.0


def test_wer_english_whisper_normaliser():
    """Whisper's EnglishTextNormalizer (whisper-normalizer), which lmms-eval's Fleurs/LibriSpeech
    scoring applies to both sides."""
    assert wer(["I do not know"], ["I don't know"], "en") == 0.0  # was 0.5 with the basic normaliser
    assert wer(["Mister Smith paid"], ["Mr. Smith paid"], "en") == 0.0
    assert wer(["the colour red"], ["the color red"], "en") == 0.0
    assert wer(["Hello, world!"], ["hello world"]) == 0.0
    assert wer(["the cat sat down"], ["the cat sat up"], "en") == pytest.approx(0.25)  # 1 substitution / 4
    # corpus WER pools the words: 1 substitution + 1 insertion over 5 reference words
    assert wer(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(0.4)
    assert wer(["one two"], [""]) == 1.0
    assert normalize_transcript("Hi [noise] there (laughs), um, DON'T!", "en") == "hi there do not"
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])


def test_cer_chinese_numbers_and_script():
    """Chinese CER as lmms-eval's Fleurs cmn / WenetSpeech scoring normalises: numerals read out in
    Chinese (cn2an), traditional -> simplified (zhconv), punctuation and spaces dropped."""
    assert cer(["二零一二年"], ["2012年"], "zh") == 0.0  # was 0.8 without number normalisation
    assert cer(["他於2012年來到臺灣。"], ["他于二零一二年来到台湾"], "zh") == 0.0
    assert cer(["我有三个苹果"], ["我有3个苹果"], "zh") == 0.0
    assert cer(["你好世界"], ["你好时间"], "zh") == pytest.approx(0.5)  # 2 substitutions / 4 characters
    assert cer(["你好 世界"], ["你好时间"]) == pytest.approx(0.5)  # no language: CJK detected
    assert cer(["abcd"], ["abed"], "en") == pytest.approx(0.25)
    assert wer(["你好世界"], ["你好时间"], "zh") == pytest.approx(0.5)  # CJK characters are words


def test_bleu_tokenizer_by_target_language_and_signature():
    """sacrebleu: the zh tokenizer for Chinese targets (as CoVoST-2 en->zh is reported), 13a otherwise."""
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    refs, hyps = ["我喜欢这只小猫"], ["我喜欢那只小猫"]
    assert bleu(refs, hyps, tokenize="13a") == 0.0  # one unsplit "word"
    zh = corpus_bleu(refs, hyps, lang="zh")
    assert zh.score == pytest.approx(bleu(refs, hyps, tokenize="zh")) and zh.score > 0
    assert "tok:zh" in zh.signature and "nrefs:1" in zh.signature
    assert "tok:13a" in corpus_bleu(["a b"], ["a b"], lang="en").signature


def test_circular_eval_counts_a_question_only_if_every_rotation_is_right():
    """MMBench's CircularEval (VLMEvalKit utils/multiple_choice.py mcq_circular_eval): N rotations of
    the options, the question is a hit only if every rotation is answered right."""
    choices = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    rots = rotations(choices, "B")
    assert [g for _, g in rots] == ["B", "A", "D", "C"]
    assert all(r[gold] == "blue" for r, gold in rots)  # the key follows its text
    rows = []
    for q, wrong_at in (("q1", None), ("q2", 3)):
        for k, (opts, gold) in enumerate(rots):
            answer = "A" if k == wrong_at and gold != "A" else gold
            rows.append(ScoreRow(id=f"{q}#{k}", prediction=answer, answers=[gold], choices=opts, group=q))
    score = score_rows("mcq_accuracy", rows)
    assert score.value == 0.5 and score.n == 2 and len(score.items) == 8  # vanilla would be 7/8
    assert [i.letter for i in score.items[:4]] == ["B", "A", "D", "C"]


def test_mcq_rows_pick_letters_or_option_text():
    choices = {"A": "red", "B": "blue"}
    assert pick_option("The answer is (B)", choices) == "B"
    assert pick_option("blue", choices) == "B" and pick_option("purple", choices) is None
    assert gold_letter("blue", choices) == "B"  # MVBench keys by the option text
    row = ScoreRow(id=1, prediction="I think it is red", answers=["A"], choices=choices)
    assert item_score("mcq_accuracy", row).letter == "A" and row.id == "1"


def test_standard_error_category_breakdown_and_failed_rows():
    rows = [ScoreRow(id=str(i), prediction=p, answers=["yes"], category={"kind": k})
            for i, (p, k) in enumerate([("yes", "a"), ("no", "a"), ("yes", "b"), ("yes", "b")])]
    rows.append(ScoreRow(id="f", prediction="yes", answers=["yes"], failed="video too long: ...",
                         category={"kind": "b"}))
    score = score_rows("exact_match", rows)
    assert score.value == pytest.approx(0.6) and score.failed == 1  # the failed row counts as an empty answer
    assert score.stderr == pytest.approx(math.sqrt(0.3 / 5))  # sample std (ddof 1) / sqrt(n): sqrt(0.3)/sqrt(5)
    assert score.by_category == {"kind": {"a": 0.5, "b": pytest.approx(2 / 3)}}
    asr = score_rows("wer", [ScoreRow(id=str(i), prediction="a b", answers=["a b"]) for i in range(3)]
                     + [ScoreRow(id="x", prediction="", answers=["a b"])], lang="en", bootstrap=200)
    assert asr.value == pytest.approx(0.25) and 0 < asr.stderr < 0.5  # 2 deletions / 8 words
    with pytest.raises(ValueError, match="unknown metric"):
        score_rows("accuracy", rows)


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
    assert not higher_is_better("wer") and not higher_is_better("asr/cer") and not higher_is_better("fleurs_zh.cer")
    assert higher_is_better("mcq_accuracy") and higher_is_better("bleu")
    assert not math.isnan(wer(["a"], ["a"]))
