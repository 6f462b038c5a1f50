"""Scoring generated answers with the paper's metrics (tools/evaluate.py).

- caption: CIDEr (pycocoevalcap's `Cider`, i.e. CIDEr-D as COCO/Flickr30K/NoCaps report it) over several
  references per image. Captions are tokenised as the COCO caption evaluation does: Stanford's PTBTokenizer
  (the jar inside pycocoevalcap, lower-cased, punctuation tokens dropped) when `java` is on PATH, otherwise
  `ptb_tokenize`, a Python version of the same rules (see docs/conversion.md, "Metrics"). A caller may
  instead pass a per-caption rule (`caption_rule`), e.g. the synthetic corpus's colour-and-shape rule, which
  lives with that corpus (data/synthetic.py), not here.
- vqa: records with `answers` (VQAv2: ten annotator answers): the VQAv2 accuracy, min(#annotators who gave
  the answer / 3, 1) averaged over the ten leave-one-annotator-out subsets, after the official answer
  normalisation (punctuation, number words, articles, contractions). Records with one `answer`: exact match
  after normalising case, surrounding space and a final full stop.
- chat: ChatML records whose last turn is the assistant's reference answer (inference/eval_data.py): exact
  match after `normalise`, or a per-answer rule the caller passes (`chat_rule`, same signature as
  `caption_rule`; the demo passes the corpus's colour-and-shape rule).
- grounding: the first `<box>` of the answer (the prompt opened it; 0..1000 coordinates, the release's
  `<box>(x1,y1),(x2,y2)</box>`) against the record's pixel box, right at IoU >= 0.5 (RefCOCO accuracy).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from .boxes import iou, parse_boxes

IOU_THRESHOLD = 0.5
SCORED_TASKS = ("caption", "vqa", "grounding", "chat")
CaptionRule = Callable[[str, list], bool]  # (prediction, references) -> right?


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def caption_exact(prediction: str, references: list) -> bool:
    """A caption rule: the prediction equals one of the references after `normalise`."""
    return any(exact_match(prediction, r) for r in references)


# ----------------------------------------------------------------------------------------------- VQAv2
# The official VQA evaluator's answer normalisation tables (GT-Vision-Lab/VQA, vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a period not before a digit)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalise(answer: str) -> str:
    """The official VQA answer processing: newlines/tabs to spaces; each punctuation mark removed when it
    touches a space (or the text has a digit,digit comma) else replaced by a space; periods not followed by a
    digit removed; lower case; number words to digits; articles dropped; contractions restored."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against the annotators' answers: for each annotator left out,
    min(#other annotators who gave the prediction / 3, 1); the mean over the annotators. Both sides are
    normalised (the official evaluator normalises the prediction, and the released annotations already are)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one annotator answer")
    pred = vqa_normalise(prediction)
    gts = [vqa_normalise(a) for a in answers]
    same = sum(g == pred for g in gts)
    return sum(min((same - (g == pred)) / 3, 1.0) for g in gts) / len(gts)


def vqa_answers(record: dict) -> list[str] | None:
    """The annotators' answers of a record: `answers` as strings or VQAv2 dicts ({"answer": ...}); None for a
    single-answer record."""
    answers = record.get("answers")
    if answers is None:
        return None
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


# ------------------------------------------------------------------------------------------------ CIDEr
# Tokens the COCO caption evaluation drops after PTB tokenisation (pycocoevalcap's PUNCTUATIONS).
_PTB_DROP = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
             ";"}
_PTB_RULES = [
    (re.compile(r'"'), " '' "),  # double quotes become `` / '' (then dropped)
    (re.compile(r"(^|\s)'(?=\S)"), r"\1 ' "),  # an opening single quote
    (re.compile(r"(?<=\S)'(\s|$)"), r" ' \1"),  # a closing single quote (kids' -> kids ')
    (re.compile(r"\.\.\.|--"), r" \g<0> "),
    (re.compile(r"[;?!@#$%&]"), r" \g<0> "),
    (re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),  # 3,000 and 3:30 stay whole
    (re.compile(r"([a-z])('s|'m|'d|'ll|'re|'ve|n't)(?=\s|$)"), r"\1 \2"),
]
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
# Words whose final period PTBTokenizer keeps (besides words with an inner period, like u.s.a.).
_PTB_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "ft", "ave", "vs", "etc", "inc",
                      "co", "corp", "ltd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
                      "nov", "dec"}


def ptb_tokenize(text: str) -> str:
    """Lower-cased PTB tokens without the punctuation tokens that the COCO evaluation drops, joined by
    spaces: pycocoevalcap's PTBTokenizer output for ordinary captions, without Java. Brackets become
    -lrb-/-rrb- (kept, as the lower-cased Java output keeps them); clitics ('s, n't, ...) are split off; a
    final period is split off and dropped except after a known abbreviation or a dotted word (u.s.a.)."""
    text = text.replace("\n", " ").lower()
    text = re.sub(r"[(){}\[\]]", lambda m: f" {_PTB_BRACKETS[m.group()]} ", text)
    for pattern, repl in _PTB_RULES:
        text = pattern.sub(repl, text)
    tokens = []
    for t in text.split():
        if len(t) > 1 and t.endswith(".") and not t.endswith("..") and "." not in t[:-1] \
                and t[:-1] not in _PTB_ABBREVIATIONS:
            tokens += [t[:-1], "."]
        else:
            tokens.append(t)
    return " ".join(t for t in tokens if t not in _PTB_DROP)


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize_java(texts: list[str]) -> list[str]:
    """pycocoevalcap's own tokenisation (Stanford PTBTokenizer 3.4.1, `-preserveLines -lowerCase`, its
    punctuation tokens dropped); the input file goes to a temporary directory, not into site-packages."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(t.replace("\n", " ") for t in texts))
        run = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True, check=True)
    lines = run.stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[:len(texts)]]


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> tuple[dict, str]:
    """{id: [caption, ...]} -> ({id: [tokenised, ...]}, the tokenizer used: "java" or "python").
    `tokenizer`: auto (java when `java` is on PATH), java, python."""
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"caption tokenizer {tokenizer!r}: expected auto, java or python")
    use = ("java" if java_available() else "python") if tokenizer == "auto" else tokenizer
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    toks = ptb_tokenize_java(flat) if use == "java" else [ptb_tokenize(c) for c in flat]
    out: dict = {k: [] for k in captions}
    for k, t in zip(keys, toks):
        out[k].append(t)
    return out, use


def cider(predictions: dict, references: dict, tokenizer: str = "auto") -> tuple[float, dict, str]:
    """CIDEr-D of {id: prediction} against {id: [references]} with pycocoevalcap's Cider scorer (document
    frequencies from these references, as COCO's evaluation computes them). Returns (corpus score, {id: score},
    tokenizer used). Scores are on pycocoevalcap's scale (papers print 100x: 1.214 is "121.4")."""
    from pycocoevalcap.cider.cider import Cider

    ids = list(predictions)
    if set(ids) != set(references):
        raise ValueError("CIDEr needs references for exactly the predicted images")
    if any(not references[i] for i in ids):
        raise ValueError("every image needs at least one reference caption")
    toks, used = tokenize_captions({**{("res", i): [predictions[i]] for i in ids},
                                    **{("gts", i): list(references[i]) for i in ids}}, tokenizer)
    score, per = Cider().compute_score({i: toks[("gts", i)] for i in ids}, {i: toks[("res", i)] for i in ids})
    return float(score), {i: float(s) for i, s in zip(ids, per)}, used


# -------------------------------------------------------------------------------------------- grounding
def grounding_iou(prediction: str, box: list[float], width: float, height: float) -> float:
    """IoU of the answer's first box (the prompt ended with `<box>`) with the reference pixel box; 0 when
    the answer holds no well-formed box."""
    boxes = parse_boxes(prediction, prefix="<box>")
    if not boxes:
        return 0.0
    return iou(boxes[0].to_pixels(width, height), box)


# --------------------------------------------------------------------------------------------- scoring
METRIC_NAMES = {"cider": "CIDEr (x100)", "rule": "caption rule", "answer-rule": "answer rule",
                "vqav2": "VQAv2 accuracy", "exact": "exact match", "grounding": f"accuracy @ IoU>={IOU_THRESHOLD}"}


@dataclass
class TaskScore:
    metric: str = "exact"
    count: int = 0
    total: float = 0.0  # sum of per-sample scores (1/0 for right/wrong)
    correct: int = 0
    corpus: float | None = None  # a corpus-level score (CIDEr)
    extra: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        if self.corpus is not None:
            return self.corpus
        return self.total / self.count if self.count else 0.0

    @property
    def accuracy(self) -> float:
        return self.total / self.count if self.count else 0.0

    def as_dict(self) -> dict:
        out = {"samples": self.count, "metric": METRIC_NAMES[self.metric], "score": self.score, **self.extra}
        if self.metric != "cider":
            out.update(correct=self.correct, accuracy=self.accuracy)
        return out


def caption_references(record: dict) -> list[str]:
    refs = record.get("captions", record.get("caption"))
    return [refs] if isinstance(refs, str) else list(refs)


def score_predictions(items: list[tuple[dict, str]], caption_rule: CaptionRule | None = None,
                      caption_tokenizer: str = "auto", chat_rule: CaptionRule | None = None
                      ) -> tuple[dict[str, TaskScore], list[dict]]:
    """Score (record, prediction) pairs of the scored tasks. Returns ({task: TaskScore}, per-item details in
    order). Captions: CIDEr over all caption items, or `caption_rule` per caption when given. VQA: the VQAv2
    accuracy for records with `answers`, exact match for records with one `answer` (one kind per file).
    Chat: `chat_rule` against the last (assistant) turn when given, else exact match with it."""
    scores: dict[str, TaskScore] = {}
    details: list[dict] = []
    cider_items: list[int] = []
    for n, (rec, pred) in enumerate(items):
        task = rec["task"]
        d: dict = {}
        if task == "caption":
            if caption_rule is None:
                metric, value = "cider", None
                cider_items.append(n)
            else:
                metric, value = "rule", float(caption_rule(pred, caption_references(rec)))
        elif task == "vqa":
            answers = vqa_answers(rec)
            if answers is not None:
                metric, value = "vqav2", vqa_accuracy(pred, answers)
                d["vqa_accuracy"] = round(value, 4)
            else:
                metric, value = "exact", float(exact_match(pred, rec["answer"]))
        elif task == "chat":
            reference = rec["conversations"][-1]["value"]
            if chat_rule is None:
                metric, value = "exact", float(exact_match(pred, reference))
            else:
                metric, value = "answer-rule", float(chat_rule(pred, [reference]))
        elif task == "grounding":
            metric = "grounding"
            v = grounding_iou(pred, rec["box"], rec["width"], rec["height"])
            value = float(v >= IOU_THRESHOLD)
            d["iou"] = round(v, 4)
        else:
            raise ValueError(f"task {task!r} is not scored; scored tasks: {SCORED_TASKS}")
        s = scores.setdefault(task, TaskScore(metric))
        if s.metric != metric:
            raise ValueError(f"{task} records mix metrics ({METRIC_NAMES[s.metric]} and {METRIC_NAMES[metric]}): "
                             f"VQA records have either `answers` (VQAv2) or one `answer`, not both kinds in one file")
        s.count += 1
        if value is not None:
            s.total += value
            s.correct += int(value == 1.0)
            d["correct"] = value == 1.0
        details.append(d)
    if cider_items:
        preds = {n: items[n][1] for n in cider_items}
        refs = {n: caption_references(items[n][0]) for n in cider_items}
        corpus, per, used = cider(preds, refs, caption_tokenizer)
        s = scores["caption"]
        s.corpus, s.total = corpus, sum(per.values())
        s.extra["tokenizer"] = "PTBTokenizer (java)" if used == "java" else "PTB rules (python)"
        for n in cider_items:
            details[n]["cider"] = round(per[n], 4)
    return scores, details


def format_table(scores: dict[str, TaskScore], skipped: dict[str, int]) -> str:
    rows = [("task", "samples", "metric", "score")]
    for task, s in scores.items():
        value = f"{100 * s.score:.2f}" if s.metric == "cider" else f"{100 * s.score:.2f}%"
        rows.append((task, str(s.count), METRIC_NAMES[s.metric], value))
    for task, n in skipped.items():
        rows.append((task, str(n), "not scored", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])
