"""Text for plain language models: fixed-length token windows for calibration (Step 2) and perplexity.

Accepted data (`--data`):
- a `.jsonl` file of `{"text": ...}` records (one a line), or a `.json` file holding a list of them;
  records without a string `text` are skipped and counted;
- a `datasets.save_to_disk` folder (a `DatasetDict`: the split the purpose prefers, see `SPLITS`),
  or a `.parquet` file or a folder of them (only the preferred split's files when the names show
  splits), with a `text` column, else the only string column;
- a folder: every `*.txt` file under it, in sorted path order, one document each;
- any other file: UTF-8 text, one document (`.txt`, a licence file, a README...).

The documents are joined with a blank line ("\\n\\n", the WikiText protocol of SparseGPT and Wanda),
tokenized once as the tokenizer does by default (one that adds a BOS token adds it once, at the
start), and cut into non-overlapping windows of `seq_len` tokens from the first token; the tail
shorter than a window is dropped. Every window is a full `seq_len` tokens: no padding.

Which windows: calibration takes `nsamples` of them in a `random.Random(seed)` shuffle of all
windows (a smaller `nsamples` gives a prefix of a larger one, as the image data does); evaluation
takes every window, or with `nsamples` the same shuffled prefix, put back in text order.
Window sources read `<data>@<first token>`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multiflow.calibration.saved_dataset import open_saved_dataset
from multiflow.errors import MultiflowError

log = logging.getLogger("multiflow")

DEFAULT_SEQ_LEN = 512  # tokens per window: CPU-friendly; SparseGPT and Wanda use 2048 on LLaMA
SEPARATOR = "\n\n"
SPLITS = {"calibration": ("train",), "evaluation": ("test", "validation", "valid", "train")}
FORMATS = ("a .txt (or any UTF-8 text) file, a folder of .txt files, a .jsonl file of {\"text\": ...} records (or a "
           ".json list of them), a datasets.save_to_disk folder, or .parquet files with a 'text' column")
ACCEPTED = f"accepted for a plain language model: {FORMATS}"
_NAMED_IN_WARNING = 5


@dataclass(frozen=True)
class TextWindow:
    """`seq_len` consecutive tokens of the text."""

    input_ids: torch.Tensor  # int64 [seq_len]
    source: str              # "<data>@<index of the first token>"


@dataclass
class TextReport:
    """What `load_windows` found and used (fields shared with calibration_data.DataReport)."""

    source: str
    kind: str                 # "text", "text-folder", "jsonl", "json", "hf-disk" or "parquet"
    documents: int
    tokens: int               # of the whole tokenized text
    seq_len: int
    available: int            # windows
    used: int
    requested: int | None     # None: all
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record, reason)


def check_seq_len(seq_len: int, config: dict[str, Any] | None = None) -> int:
    """`seq_len` as a window length: at least 2 tokens (one predicted), within the model's positions."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MultiflowError(f"--seq-len {seq_len}: give a window length of at least 2 tokens")
    limit = (config or {}).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise MultiflowError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit}); "
                             f"give --seq-len {limit} or less")
    return seq_len


def require_data(data: str | os.PathLike | None, purpose: str = "calibration") -> None:
    """No bundled text ships: a plain language model needs --data."""
    if purpose not in SPLITS:
        raise ValueError(f"purpose {purpose!r}: one of {', '.join(SPLITS)}")
    if data is None:
        raise MultiflowError(f"a plain language model is {'calibrated' if purpose == 'calibration' else 'evaluated'}"
                             f" on text: pass --data PATH ({FORMATS})")


def load_tokenizer(folder: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint folder's tokenizer; a MultiflowError naming the folder when there is none."""
    from transformers import AutoTokenizer

    if trust_remote_code:
        from multiflow.models.loading import warn_remote_code

        warn_remote_code(Path(folder))
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MultiflowError(f"cannot load a tokenizer from {folder}: {exc}. A plain language model needs its "
                             "tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json) next to "
                             "the weights") from exc


def load_windows(data: str | os.PathLike | None, tokenizer: Any, seq_len: int = DEFAULT_SEQ_LEN,
                 nsamples: int | None = None, seed: int = 0, purpose: str = "calibration",
                 model_config: dict[str, Any] | None = None) -> tuple[list[TextWindow], TextReport]:
    """Token windows of `data` for `purpose` ("calibration" or "evaluation"), and a report.

    `nsamples` None takes every window (in text order). `model_config` (config.json): `seq_len`
    must fit its max_position_embeddings."""
    require_data(data, purpose)
    check_seq_len(seq_len, model_config)
    if nsamples is not None and nsamples < 1:
        raise MultiflowError(f"--nsamples {nsamples}: give at least 1")
    source, kind, documents, skipped = read_documents(data, SPLITS[purpose])
    if not documents:
        raise MultiflowError(f"no text in {source}" + (f": {len(skipped)} record(s) without a string 'text' (first: "
                                                       f"{skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    ids = tokenize(tokenizer, documents)
    count = ids.numel() // seq_len
    if count == 0:
        raise MultiflowError(f"the text in {source} has {ids.numel()} tokens, fewer than one window of --seq-len "
                             f"{seq_len}; give more text or a smaller --seq-len")
    order = list(range(count))
    if nsamples is not None:
        random.Random(seed).shuffle(order)
        order = order[:nsamples]
        if purpose == "evaluation":
            order.sort()
    windows = [TextWindow(ids[i * seq_len:(i + 1) * seq_len].clone(), f"{source}@{i * seq_len}") for i in order]
    report = TextReport(source, kind, len(documents), ids.numel(), seq_len, count, len(windows), nsamples, skipped)
    _log_outcome(report, purpose)
    return windows, report


def tokenize(tokenizer: Any, documents: list[str]) -> torch.Tensor:
    """The documents joined by SEPARATOR, tokenized as the tokenizer does by default: int64 [tokens]."""
    encoded = tokenizer(SEPARATOR.join(documents), verbose=False)["input_ids"]
    return torch.tensor(encoded, dtype=torch.int64)


def encode_windows(windows: list[TextWindow]):
    """A batch of windows as model inputs: input_ids and an all-ones attention_mask ([batch, seq_len])."""
    from transformers import BatchEncoding

    ids = torch.stack([w.input_ids for w in windows])
    return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


# --- reading documents ----------------------------------------------------------------------------

def read_documents(data: str | os.PathLike, splits: tuple[str, ...] = ("train",),
                   ) -> tuple[str, str, list[str], list[tuple[str, str]]]:
    """(source, kind, documents, skipped records) of a text data path."""
    if not str(data):
        raise MultiflowError(f"text data '': empty path; {ACCEPTED}")
    path = Path(data)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return (str(path), "jsonl", *_jsonl_documents(path))
        if suffix == ".json":
            return (str(path), "json", *_json_documents(path))
        if suffix == ".parquet":
            return str(path), "parquet", _parquet_documents(str(path), [path]), []
        return str(path), "text", [_read_text(path)], []
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            source, documents = _hf_disk_documents(path, splits)
            return source, "hf-disk", documents, []
        parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if parquet:
            chosen = _split_files(path, parquet, splits)
            source = f"{path} ({len(chosen)} parquet file(s)" + (
                f" of {len(parquet)})" if len(chosen) < len(parquet) else ")")
            return source, "parquet", _parquet_documents(source, chosen), []
        texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if texts:
            return f"{path} ({len(texts)} .txt file(s))", "text-folder", [_read_text(p) for p in texts], []
        raise MultiflowError(f"text data {path}: no .txt file, no .parquet file and no datasets.save_to_disk files "
                             f"in this folder; {ACCEPTED}")
    raise MultiflowError(f"text data {path} not found; {ACCEPTED}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MultiflowError(f"{path}: not UTF-8 text (byte {error.start}); {ACCEPTED}") from None
    except OSError as error:
        raise MultiflowError(f"{path}: cannot read ({error.strerror})") from None


def _from_records(records, skipped: list[tuple[str, str]]) -> list[str]:
    documents = []
    for where, record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str):
            documents.append(text)
        else:
            skipped.append((where, "no string 'text'" if isinstance(record, dict) else
                            f"a {type(record).__name__}, not a record"))
    return documents


def _jsonl_documents(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    def records():
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise MultiflowError(f"{path}: line {number} is not valid JSON ({error.msg}); give one "
                                     "{\"text\": ...} record a line") from None

    skipped: list[tuple[str, str]] = []
    return _from_records(records(), skipped), skipped


def _json_documents(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise MultiflowError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}; "
                             "give a list of {\"text\": ...} records") from None
    if not isinstance(records, list):
        raise MultiflowError(f"{path}: holds a {type(records).__name__}, expected a list of {{\"text\": ...}} "
                             "records (one record a line: use a .jsonl file)")
    skipped: list[tuple[str, str]] = []
    return _from_records(((f"{path.name}[{i}]", r) for i, r in enumerate(records)), skipped), skipped


def _text_column(columns: list[str], is_string, source: str) -> str:
    if "text" in columns:
        return "text"
    strings = [c for c in columns if is_string(c)]
    if len(strings) == 1:
        return strings[0]
    raise MultiflowError(f"{source}: no 'text' column (columns: {', '.join(columns)}); "
                         + ("several string columns: rename the one to use to 'text'" if strings else
                            "a plain language model needs a column of text"))


def _hf_disk_documents(path: Path, splits: tuple[str, ...]) -> tuple[str, list[str]]:
    import datasets

    loaded, source = open_saved_dataset(path, splits, ACCEPTED, "no text in")
    features = loaded.features
    column = _text_column(list(loaded.column_names), lambda c: isinstance(features[c], datasets.Value)
                          and features[c].dtype in ("string", "large_string"), source)
    return source, [t for t in loaded[column] if isinstance(t, str)]


def _split_files(root: Path, files: list[Path], splits: tuple[str, ...]) -> list[Path]:
    """The files of the first preferred split the names show (test-0000.parquet, test/...), else all."""
    for split in splits:
        chosen = [f for f in files if f.relative_to(root).name.lower().startswith(split)
                  or split in (p.lower() for p in f.relative_to(root).parts[:-1])]
        if chosen:
            return chosen
    return files


def _parquet_documents(source: str, files: list[Path]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents: list[str] = []
    column = None
    for file in files:
        try:
            reader = pq.ParquetFile(file)
            schema = reader.schema_arrow
            if column is None:
                column = _text_column(list(schema.names), lambda c: pa.types.is_string(schema.field(c).type)
                                      or pa.types.is_large_string(schema.field(c).type), source)
            if column not in schema.names:
                raise MultiflowError(f"{file}: no column {column!r} (columns: {', '.join(schema.names)}), which "
                                     f"{files[0].name} has")
            documents.extend(t for t in reader.read(columns=[column]).column(0).to_pylist() if isinstance(t, str))
        except MultiflowError:
            raise
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError...
            raise MultiflowError(f"{file}: cannot read parquet ({type(error).__name__}: {error})") from None
    return documents


def _log_outcome(report: TextReport, purpose: str) -> None:
    if report.skipped:
        named = ", ".join(f"{where} ({why})" for where, why in report.skipped[:_NAMED_IN_WARNING])
        more = len(report.skipped) - _NAMED_IN_WARNING
        log.warning("skipped %d record(s) in %s: %s%s", len(report.skipped), report.source, named,
                    f" and {more} more" if more > 0 else "")
    if report.requested is not None and report.used < report.requested:
        log.warning("asked for %d windows of %d tokens, the text in %s has %d: using all %d", report.requested,
                    report.seq_len, report.source, report.available, report.used)
    log.info("%s text: %d window(s) of %d tokens from %s (%d documents, %d tokens)", purpose, report.used,
             report.seq_len, report.source, report.documents, report.tokens)
