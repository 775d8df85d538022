"""Calibration samples for Step 2: (image, question, answer) triples from a file, a folder or the bundled set.

Accepted data:
- a `.json` file holding a list of records or a `.jsonl` file (one record a line). A record is
  `{"image": path, "question": ..., "answer": ...}` (answer optional) or LLaVA's training format
  `{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}`
  (first human turn without the `<image>` token = question, the gpt turn after it = answer), or an
  image-caption pair `{"image": path, "caption": ...[, "label": ...]}` ("text" for "caption"): the
  caption is the sample's text (`Sample.question` and `Sample.caption`), the label a class name for
  zero-shot classification (retrieval models, evaluation/retrieval.py).
  Relative image paths are resolved against `image_folder`, by default the JSON file's folder.
  Records without an image are left out and counted (`DataReport.without_image`).
- a folder written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`: its "train" split if
  present, else the first), or a `.parquet` file or a folder of them (only the files of the train
  split when the names show splits). Columns: an image column (`image`, else the first
  `datasets.Image` column) and `question`/`answer`, `questions`/`answers` lists (one image, several
  questions: each pair is one candidate), LLaVA `conversations`, or `caption` [+ `label`].
- `None`: the bundled set (see `describe_bundled()`).

Sampling: a `random.Random(seed)` shuffle of all candidate (image, question) pairs, then the first
usable ones in that order, so a smaller `nsamples` gives a prefix of a larger one. Images are decoded
only when taken. Images become RGB: transparency (RGBA, LA, PA, P or L with a transparent colour) is
composited onto white; 16-bit grayscale is divided by 257; 32-bit integer and float grayscale stay as
they are when within 0..255, else are stretched from their min..max to 0..255; every other mode
(L, 1, P, CMYK, YCbCr, ...) goes through PIL's `convert("RGB")`. Missing, unreadable or corrupt
images and images with a side under 2 pixels are skipped, listed in the report and named in one
warning.

Bounded memory: an image is never kept at full resolution. Its longest side is brought to at most
`MAX_SIDE` = 2048 px as soon as it is decoded (about twice the largest side any supported processor
uses: LLaVA-1.5 336, BLIP 384, LLaVA-NeXT grids up to 1008; Qwen2-VL then sees at most 4.2 megapixels),
so a kept sample costs at most 12 MB. JPEG is decoded directly at 1/2, 1/4 or 1/8 scale (PIL's
`draft`); every format is then reduced by an integer factor (box average, `Image.reduce`) strip by
strip, each strip converted to RGB as above, so no full-resolution copy is made besides the decoded
image itself. PIL decodes PNG and the other formats whole: such an image costs up to 4 bytes a pixel
while it is reduced (one image at a time), within PIL's decompression-bomb limits, which stay
(`PIL.Image.MAX_IMAGE_PIXELS`: above twice it the image is skipped as too large; between once and
twice, PIL's warning is logged in one line naming the sample). Images whose short side would fall
under 2 px once reduced (aspect ratio over 1024:1) are skipped as degenerate.

Sample sources: `data.jsonl:12` (line 12), `data.json[3]` (record 3, from 0), `<folder>[5]` or
`<file>.parquet[5]` (row 5, from 0), `#q1` for the question of index 1 of a list column,
`bundled:coffee#q0`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import warnings
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from multiflow.calibration import bundled as bundled_data
from multiflow.calibration.saved_dataset import open_saved_dataset
from multiflow.errors import MultiflowError

log = logging.getLogger("multiflow")

ACCEPTED = ("accepted: a .json (list of records) or .jsonl file with {image, question[, answer]}, LLaVA "
            "{image, conversations} or {image, caption[, label]} records, a datasets.save_to_disk folder, a .parquet file or a folder "
            "of .parquet files, or no data for the bundled set")
EXPECTED_COLUMNS = ("an image column ('image' or a datasets.Image feature) with 'question' [+ 'answer'], "
                    "'questions' [+ 'answers'] list columns, LLaVA 'conversations', or 'caption' [+ 'label']")
MIN_SIDE = 2
MAX_SIDE = 2048  # longest side of a kept image (module docstring: bounded memory)
_STRIP_PIXELS = 1 << 22  # source pixels converted to RGB at once while reducing a large image
_NAMED_IN_WARNING = 5
_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant")


@dataclass(frozen=True)
class Sample:
    """One calibration input: an RGB image, a question about it and its answer when known."""

    image: Image.Image
    question: str
    answer: str | None
    source: str
    kind: str | None = None  # question kind, when the data names one (JSON "kind" / "question_type")
    caption: str | None = None  # an image-caption record's caption (then also `question`)
    label: str | None = None  # its class name, when the record gives one ("label")


@dataclass
class DataReport:
    """What `load_samples` found and used."""

    source: str                      # the path (with the split or parquet files chosen) or "bundled: ..."
    kind: str                        # "json", "jsonl", "llava-json", "hf-disk", "parquet" or "bundled"
    available: int                   # candidate (image, question) pairs
    used: int
    skipped: list[tuple[str, str]]   # (sample source, reason): unusable images met, rows with no question
    requested: int
    without_image: int = 0           # JSON records without an image, left out (not candidates)


@dataclass(frozen=True)
class _Candidate:
    source: str
    question: str
    answer: str | None
    ref: Any  # what the data's fetch needs to find the image: a path, a row index...
    kind: str | None = None
    caption: str | None = None
    label: str | None = None


@dataclass
class _Data:
    source: str
    kind: str
    candidates: list[_Candidate]
    fetch: Callable[[Sequence[_Candidate]], list[Any]]  # raw image payloads, in the same order
    without_image: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # found while listing candidates


class _Unusable(Exception):
    """An image that cannot be used; the message is the reason."""


def load_samples(
    data: str | os.PathLike | None,
    nsamples: int = 128,
    seed: int = 0,
    *,
    image_folder: str | os.PathLike | None = None,
) -> tuple[list[Sample], DataReport]:
    """`nsamples` usable calibration samples chosen by `seed`, and a report of what was found."""
    if nsamples < 1:
        raise MultiflowError(f"nsamples {nsamples}: ask for at least 1 calibration sample")
    opened = _open(data, None if image_folder is None else Path(image_folder))
    if not opened.candidates:
        raise MultiflowError(f"no sample in --data {opened.source}: {_why_empty(opened)}")
    order = list(range(len(opened.candidates)))
    random.Random(seed).shuffle(order)
    samples, skipped = _take(opened, order, nsamples)
    skipped = opened.skipped + skipped
    report = DataReport(opened.source, opened.kind, len(opened.candidates), len(samples), skipped, nsamples,
                        opened.without_image)
    if not samples:
        raise MultiflowError(f"no usable sample in --data {opened.source}: {len(skipped)} skipped "
                             f"({_reason_counts(skipped)}); first: {skipped[0][0]} ({skipped[0][1]})")
    _log_outcome(report)
    return samples, report


def describe_bundled() -> str:
    """One paragraph: the bundled images, the package each ships in, and its licence."""
    return bundled_data.describe()


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image` (conversions as in the module docstring), at full resolution."""
    return _to_rgb(image, _gray_span(image))


def reduced_rgb(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """An RGB copy of `image` with its longest side at most `max_side`, made without a full-size copy.

    The side is divided by the smallest integer factor that fits (box average, `Image.reduce`), one
    strip of rows at a time: each strip is converted as `to_rgb` converts the whole image, so the
    result equals `to_rgb(image).reduce(factor)` exactly.
    """
    width, height = image.size
    factor = -(-max(width, height) // max_side)
    span = _gray_span(image)
    if factor == 1:
        return _to_rgb(image, span)
    if -(-min(width, height) // factor) < MIN_SIDE:
        raise _Unusable(f"degenerate image: {width}x{height} px (a side under {MIN_SIDE} px once the longest "
                        f"is reduced to {max_side} px)")
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))), span)
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def _to_rgb(image: Image.Image, span: tuple[float, float] | None) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _wide_gray_to_rgb(image, span)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _gray_span(image: Image.Image) -> tuple[float, float] | None:
    """(min, max) of a 32-bit integer or float grayscale image out of 0..255 (non-finite values
    counted as 0), which `_wide_gray_to_rgb` stretches to 0..255; None when it keeps the values."""
    if image.mode not in ("I", "F"):
        return None
    import numpy as np

    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    low, high = 0.0, 0.0
    for top in range(0, height, rows):  # in strips: no float64 copy of the whole image
        values = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float64)
        values = np.where(np.isfinite(values), values, 0.0)
        if values.size:
            low, high = (float(values.min()), float(values.max())) if top == 0 else (
                min(low, float(values.min())), max(high, float(values.max())))
    return (low, high) if low < 0 or high > 255 else None


def _wide_gray_to_rgb(image: Image.Image, span: tuple[float, float] | None) -> Image.Image:
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif span is not None:
        low, high = span
        values = (values - low) * (255.0 / (high - low) if high > low else 0.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


# --- choosing and decoding ------------------------------------------------------------------------

def _take(opened: _Data, order: list[int], nsamples: int) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Walk the shuffled order, fetching only as many images as still needed each round."""
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    position = 0
    while len(samples) < nsamples and position < len(order):
        chunk = [opened.candidates[i] for i in order[position:position + nsamples - len(samples)]]
        position += len(chunk)
        for candidate, payload in zip(chunk, opened.fetch(chunk)):
            try:
                with warnings.catch_warnings(record=True) as caught:  # PIL's, e.g. DecompressionBombWarning
                    warnings.simplefilter("always")
                    image = _decode(payload)
            except _Unusable as unusable:
                skipped.append((candidate.source, str(unusable)))
                continue
            finally:
                for warning in caught:
                    log.warning("%s: %s: %s", candidate.source, warning.category.__name__, warning.message)
            samples.append(Sample(image, candidate.question, candidate.answer, candidate.source, candidate.kind,
                                  candidate.caption, candidate.label))
    return samples, skipped


def _decode(payload: Any) -> Image.Image:
    """A PIL image, bytes, a {bytes, path} dict or a path -> RGB image; _Unusable with the reason."""
    if isinstance(payload, _Unusable):
        raise payload
    if isinstance(payload, Image.Image):
        return _checked_rgb(payload)
    if isinstance(payload, dict):
        payload = payload.get("bytes") or payload.get("path")
    if payload is None or payload == b"" or payload == "":
        raise _Unusable("no image")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return _open_image(io.BytesIO(bytes(payload)))
    if not isinstance(payload, (str, os.PathLike)):
        raise _Unusable(f"unreadable image: a {type(payload).__name__} value, not an image, bytes or a path")
    path = Path(payload)
    if not path.is_file():
        raise _Unusable(f"missing file: {path}")
    return _open_image(path)


def _open_image(file: Path | io.BytesIO) -> Image.Image:
    try:
        with Image.open(file) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                raise _Unusable(f"degenerate image: {width}x{height} px (a side under {MIN_SIDE})")
            if max(width, height) > MAX_SIDE:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= what is kept
                scale = MAX_SIDE / max(width, height)
                image.draft(None, (max(MIN_SIDE, int(width * scale) + 1), max(MIN_SIDE, int(height * scale) + 1)))
            image.load()
            return reduced_rgb(image)
    except _Unusable:
        raise
    except Image.DecompressionBombError as error:
        raise _Unusable(f"unreadable image: too large ({error})") from None
    except Exception as error:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error...
        raise _Unusable(f"unreadable image: {type(error).__name__}: {error}") from None


def _checked_rgb(image: Image.Image) -> Image.Image:
    if min(image.size) < MIN_SIDE:
        raise _Unusable(f"degenerate image: {image.size[0]}x{image.size[1]} px (a side under {MIN_SIDE})")
    try:
        return reduced_rgb(image)
    except _Unusable:
        raise
    except Exception as error:
        raise _Unusable(f"unreadable image: {type(error).__name__}: {error}") from None


def _reason_counts(skipped: list[tuple[str, str]]) -> str:
    counts = Counter(reason.split(":")[0] for _, reason in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _why_empty(opened: _Data) -> str:
    if opened.without_image:
        return f"none of its {opened.without_image} records has an image"
    if opened.skipped:
        return f"{len(opened.skipped)} records without a question ({_reason_counts(opened.skipped)})"
    return "it holds no record"


def _log_outcome(report: DataReport) -> None:
    if report.without_image:
        log.info("%d record(s) without an image in %s were left out", report.without_image, report.source)
    if report.skipped:
        named = ", ".join(f"{source} ({reason})" for source, reason in report.skipped[:_NAMED_IN_WARNING])
        more = len(report.skipped) - _NAMED_IN_WARNING
        log.warning("skipped %d calibration sample(s) in %s (%s): %s%s", len(report.skipped), report.source,
                    _reason_counts(report.skipped), named, f" and {more} more" if more > 0 else "")
    if report.used < report.requested:
        log.warning("asked for %d calibration samples, found %d usable in %s: using all %d",
                    report.requested, report.used, report.source, report.used)
    log.info("calibration data: %d sample(s) from %s (%s)", report.used, report.source, report.kind)


# --- opening the data -------------------------------------------------------------------------

def _open(data: str | os.PathLike | None, image_folder: Path | None) -> _Data:
    if data is None:
        return _open_bundled()
    if not str(data):
        raise MultiflowError(f"--data '': empty path; {ACCEPTED}")
    path = Path(data)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return _open_json(path, image_folder or path.parent)
        if suffix in (".jsonl", ".ndjson"):
            return _open_jsonl(path, image_folder or path.parent)
        if suffix == ".parquet":
            return _open_parquet(str(path), [path], image_folder or path.parent)
        raise MultiflowError(f"--data {path}: unknown format '{suffix}'; {ACCEPTED}")
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _open_hf_disk(path, image_folder or path)
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            chosen = _train_files(path, files)
            described = f"{path} ({len(chosen)} parquet file(s)" + (
                f" of the train split, of {len(files)})" if len(chosen) < len(files) else ")")
            return _open_parquet(described, chosen, image_folder or path)
        raise MultiflowError(f"--data {path}: no dataset in this folder (no datasets.save_to_disk "
                             f"files, no .parquet file); {ACCEPTED}")
    raise MultiflowError(f"--data {path} not found; {ACCEPTED}")


def _open_bundled() -> _Data:
    candidates = [
        _Candidate(f"bundled:{image.name}#q{i}", question, answer, image)
        for image in bundled_data.BUNDLED_IMAGES for i, (question, answer) in enumerate(image.qa)
    ]
    source = (f"bundled: {len(bundled_data.BUNDLED_IMAGES)} images from scikit-image and matplotlib "
              f"(see describe_bundled())")
    return _Data(source, "bundled", candidates, _fetch_bundled)


def _fetch_bundled(chunk: Sequence[_Candidate]) -> list[Any]:
    payloads: list[Any] = []
    for candidate in chunk:
        try:
            payloads.append(bundled_data.image_path(candidate.ref))
        except ModuleNotFoundError as error:
            payloads.append(_Unusable(f"missing file: package {error.name} is not installed"))
    return payloads


def _fetch_paths(chunk: Sequence[_Candidate]) -> list[Any]:
    return [candidate.ref for candidate in chunk]


# --- JSON / JSONL -----------------------------------------------------------------------------

def _open_json(path: Path, base: Path) -> _Data:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MultiflowError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): "
                             f"{error.msg}; give a list of records") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MultiflowError(f"{path}: cannot read ({error})") from None
    if not isinstance(records, list):
        raise MultiflowError(f"{path}: holds a {type(records).__name__}, expected a list of records "
                             f"(one record a line: use a .jsonl file)")
    return _from_records(path, base, "json", ((f"{path.name}[{i}]", f"record [{i}]", r)
                                               for i, r in enumerate(records)))


def _open_jsonl(path: Path, base: Path) -> _Data:
    def records() -> Iterable[tuple[str, str, Any]]:
        try:
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise MultiflowError(f"{path} line {number}: not valid JSON ({error.msg}); "
                                             f"write one JSON record a line") from None
                    yield f"{path.name}:{number}", f"line {number}", record
        except (OSError, UnicodeDecodeError) as error:
            raise MultiflowError(f"{path}: cannot read ({error})") from None

    return _from_records(path, base, "jsonl", records())


def _from_records(path: Path, base: Path, kind: str, records: Iterable[tuple[str, str, Any]]) -> _Data:
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    without_image = 0
    saw_llava = False
    for source, where, record in records:
        question, answer, llava = _record_text(record, f"{path} {where}")
        saw_llava = saw_llava or llava
        image = record.get("image")
        if image is None or image == "":
            without_image += 1
            continue
        if not isinstance(image, str):
            raise MultiflowError(f"{path} {where}: 'image' is a {type(image).__name__}, expected a path "
                                 f"(relative to {base} or absolute)")
        if not question:
            skipped.append((source, "no question: empty question text"))
            continue
        question_kind = record.get("kind", record.get("question_type"))
        caption = None if "question" in record or "conversations" in record else question  # an image-caption pair
        candidates.append(_Candidate(source, question, answer, base / image,
                                     question_kind if isinstance(question_kind, str) else None,
                                     caption, _label(record.get("label"), f"{path} {where}")))
    return _Data(str(path), "llava-json" if saw_llava else kind, candidates, _fetch_paths, without_image, skipped)


def _record_text(record: Any, where: str) -> tuple[str, str | None, bool]:
    """(question, answer, is LLaVA conversations) of one JSON record or table row."""
    if not isinstance(record, dict):
        raise MultiflowError(f"{where}: a {type(record).__name__}, expected an object with 'image' and "
                             f"'question' [+ 'answer'] or LLaVA 'conversations'")
    if "question" in record:
        question, answer = record["question"], record.get("answer")
        if not isinstance(question, str) or not (answer is None or isinstance(answer, str)):
            raise MultiflowError(f"{where}: 'question' and 'answer' must be strings")
        return question.strip(), answer, False
    if "conversations" in record:
        question, answer = _first_exchange(record["conversations"], where)
        return question, answer, True
    caption = _caption(record, where)
    if caption is not None:
        return caption, None, False
    raise MultiflowError(f"{where}: keys {sorted(record)}; expected 'image' with 'question' [+ 'answer'], "
                         f"LLaVA 'conversations' ([{{'from': 'human', 'value': ...}}, {{'from': 'gpt', ...}}]) "
                         f"or 'caption' [+ 'label']")


def _caption(record: dict, where: str) -> str | None:
    """An image-caption record's caption ("caption", else "text"), stripped; None when it has neither."""
    key = "caption" if "caption" in record else "text" if "text" in record else None
    if key is None:
        return None
    if not isinstance(record[key], str):
        raise MultiflowError(f"{where}: '{key}' must be a string")
    return record[key].strip()


def _label(value: Any, where: str) -> str | None:
    """A class label: a string or a whole number (written as text); None when absent."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MultiflowError(f"{where}: 'label' must be a string or a whole number, not {type(value).__name__}")


def _first_exchange(conversations: Any, where: str) -> tuple[str, str | None]:
    """The first human turn without `<image>` and the assistant turn right after it."""
    turns = conversations if isinstance(conversations, list) else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise MultiflowError(f"{where}: conversation turn {i} is not {{'from': ..., 'value': <text>}}")
        if turn.get("from") in _HUMAN:
            question = turn["value"].replace("<image>", "").strip()
            after = turns[i + 1] if i + 1 < len(turns) else None
            answer = after["value"] if isinstance(after, dict) and after.get("from") in _ASSISTANT else None
            return question, answer if isinstance(answer, str) else None
    raise MultiflowError(f"{where}: 'conversations' has no human turn; expected a list of "
                         f"{{'from': 'human' | 'gpt', 'value': <text>}}")


# --- tables: datasets.save_to_disk and parquet -----------------------------------------------

@dataclass(frozen=True)
class _Columns:
    image: str
    text: tuple[str, ...]  # ("question", "answer"?), ("questions", "answers"?) or ("conversations",)


def _pick_columns(names: list[str], image_like: Callable[[str], bool], where: str) -> _Columns:
    image = "image" if "image" in names else next((n for n in names if image_like(n)), None)
    if "question" in names:
        text = ("question", "answer") if "answer" in names else ("question",)
    elif "questions" in names:
        text = ("questions", "answers") if "answers" in names else ("questions",)
    elif "conversations" in names:
        text = ("conversations",)
    elif "caption" in names:
        text = ("caption", "label") if "label" in names else ("caption",)
    else:
        text = ()
    if image is None or not text:
        raise MultiflowError(f"{where}: columns found: {', '.join(names) or 'none'}; expected {EXPECTED_COLUMNS}")
    return _Columns(image, text)


def _table_candidates(label: Callable[[int], str], text: dict[str, list[Any]], columns: _Columns,
                      where: str) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Candidates whose ref is the row index; rows with an empty question are listed as skipped."""
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    first = columns.text[0]
    for row in range(len(text[first])):
        if first == "questions":
            questions = text["questions"][row] or []
            answers = text["answers"][row] if "answers" in text else None
            pairs = [(f"{label(row)}#q{i}", q, answers[i] if answers is not None and i < len(answers) else None)
                     for i, q in enumerate(questions)]
        elif first == "question":
            pairs = [(label(row), text["question"][row], text["answer"][row] if "answer" in text else None)]
        elif first == "caption":
            caption = text["caption"][row]
            if isinstance(caption, str) and caption.strip():
                candidates.append(_Candidate(label(row), caption.strip(), None, row, caption=caption.strip(),
                                             label=_label(text["label"][row] if "label" in text else None,
                                                          f"{where} row {row}")))
            else:
                skipped.append((label(row), "no question: empty or missing caption text"))
            continue
        else:
            question, answer = _first_exchange(text["conversations"][row], f"{where} row {row}")
            pairs = [(label(row), question, answer)]
        for source, question, answer in pairs:
            if not isinstance(question, str) or not question.strip():
                skipped.append((source, "no question: empty or missing question text"))
                continue
            candidates.append(_Candidate(source, question.strip(), answer if isinstance(answer, str) else None, row))
    return candidates, skipped


def _resolved(value: Any, base: Path) -> Any:
    """Image cell -> payload for _decode, with relative paths resolved against `base`."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        return base / value["path"]
    if isinstance(value, str) and value:
        return base / value
    return value


def _open_hf_disk(path: Path, base: Path) -> _Data:
    import datasets

    if _saved_without_data(path):  # datasets writes no data file for 0 rows, then cannot load it
        raise MultiflowError(f"no sample in --data {path}: it holds no record")
    dataset, source = open_saved_dataset(path, ("train",), ACCEPTED, "no sample in --data")
    columns = _pick_columns(list(dataset.column_names),
                            lambda n: isinstance(dataset.features[n], datasets.Image), source)
    text = {name: list(dataset[name]) for name in columns.text}
    candidates, skipped = _table_candidates(lambda row: f"{path.name}[{row}]", text, columns, source)
    images = dataset.select_columns([columns.image])
    if isinstance(dataset.features[columns.image], datasets.Image):
        images = images.cast_column(columns.image, datasets.Image(decode=False))

    def fetch(chunk: Sequence[_Candidate]) -> list[Any]:
        values = images[[candidate.ref for candidate in chunk]][columns.image]
        return [_resolved(value, base) for value in values]

    return _Data(source, "hf-disk", candidates, fetch, skipped=skipped)


def _saved_without_data(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _train_files(root: Path, files: list[Path]) -> list[Path]:
    """The train split's files when the names show splits (train-0000.parquet, train/...), else all."""
    def is_train(file: Path) -> bool:
        relative = file.relative_to(root)
        return relative.name.lower().startswith("train") or "train" in (p.lower() for p in relative.parts[:-1])

    train = [f for f in files if is_train(f)]
    return train or files


def _open_parquet(source: str, files: list[Path], base: Path) -> _Data:
    import pyarrow.parquet as pq

    try:
        readers = [pq.ParquetFile(f) for f in files]
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError...
        raise MultiflowError(f"{source}: cannot read parquet ({type(error).__name__}: {error})") from None
    schema = readers[0].schema_arrow
    image_features = _hf_image_columns(schema)
    columns = _pick_columns(list(schema.names), lambda n: n in image_features or _is_image_struct(schema, n),
                            source)
    for file, reader in zip(files, readers):
        missing = [c for c in (columns.image, *columns.text) if c not in reader.schema_arrow.names]
        if missing:
            raise MultiflowError(f"{file}: columns found: {', '.join(reader.schema_arrow.names)}; "
                                 f"lacks {', '.join(missing)} that {files[0].name} has")
    starts = [0]  # global row index of each file's first row
    for reader in readers:
        starts.append(starts[-1] + reader.metadata.num_rows)
    text: dict[str, list[Any]] = {name: [] for name in columns.text}
    for reader in readers:
        table = reader.read(columns=list(columns.text))
        for name in columns.text:
            text[name].extend(table.column(name).to_pylist())

    def label(row: int) -> str:
        index = bisect_right(starts, row) - 1
        return f"{files[index].name}[{row - starts[index]}]"

    candidates, skipped = _table_candidates(label, text, columns, source)
    group_starts = [_row_group_starts(reader) for reader in readers]

    def fetch(chunk: Sequence[_Candidate]) -> list[Any]:
        wanted: dict[tuple[int, int], list[int]] = {}  # (file, row group) -> rows inside it
        where: list[tuple[int, int, int]] = []
        for candidate in chunk:
            index = bisect_right(starts, candidate.ref) - 1
            local = candidate.ref - starts[index]
            group = bisect_right(group_starts[index], local) - 1
            offset = local - group_starts[index][group]
            wanted.setdefault((index, group), []).append(offset)
            where.append((index, group, offset))
        values: dict[tuple[int, int, int], Any] = {}
        for (index, group), offsets in wanted.items():
            column = readers[index].read_row_group(group, columns=[columns.image]).column(0)
            for offset in offsets:
                values[(index, group, offset)] = column[offset].as_py()
        return [_resolved(values[key], base) for key in where]

    return _Data(source, "parquet", candidates, fetch, skipped=skipped)


def _row_group_starts(reader: Any) -> list[int]:
    starts = [0]
    for group in range(reader.metadata.num_row_groups - 1):
        starts.append(starts[-1] + reader.metadata.row_group(group).num_rows)
    return starts


def _hf_image_columns(schema: Any) -> set[str]:
    """Columns that the `datasets` metadata of a parquet file declares as Image features."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = info.get("info", {}).get("features", {})
        return {name for name, feature in features.items()
                if isinstance(feature, dict) and feature.get("_type") == "Image"}
    except (ValueError, AttributeError):
        return set()


def _is_image_struct(schema: Any, name: str) -> bool:
    import pyarrow as pa

    kind = schema.field(name).type
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} >= {"bytes", "path"}
