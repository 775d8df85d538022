"""A GGUF file (llama.cpp's format) as a safetensors checkpoint folder that every multiflow command reads.

transformers reads the GGUF (with the `gguf` package), dequantizes every weight into a plain
float model (`GgufConfig(dequantize=True)`, in `dtype`) and writes it with `save_pretrained`:
config.json, model.safetensors (tied embeddings stay tied: no `lm_head` tensor, as in the file),
generation_config.json, and the tokenizer rebuilt from the file's metadata. The folder also holds
`multiflow_report.json` (the source file, its sha256, the dtype), so `--overwrite` may replace it.
The whole dequantized model is in memory once (135M parameters: 0.5 GB in float32).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from multiflow.errors import MultiflowError
from multiflow.storage.checkpoint import file_sha256

DTYPES = ("float32", "float16", "bfloat16")


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MultiflowError("reading GGUF files needs the gguf package: pip install gguf")


def convert_gguf(file: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32",
                 overwrite: bool = False) -> dict[str, Any]:
    """Write `file` dequantized into the checkpoint folder `output`; return what was written."""
    import torch

    from multiflow._version import __version__
    from multiflow.storage.outputs import REPORT_NAME, FolderOutput, file_mode

    file = Path(file)
    if dtype not in DTYPES:
        raise MultiflowError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not file.is_file():
        raise MultiflowError(f"GGUF file {file} not found")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MultiflowError(f"{file} is not a GGUF file (it does not start with the bytes 'GGUF')")
    require_gguf()
    target = FolderOutput(output, {"the GGUF file": file}, overwrite)
    model, tokenizer = _load(file, getattr(torch, dtype))
    with target.building() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():  # save_pretrained writes some files 0o600: give all the umask's modes
            if path.is_file():
                os.chmod(path, file_mode())
        config = json.loads((tmp / "config.json").read_text())
        summary = {
            "tool": "multiflow", "version": __version__, "command": "convert-gguf", "model": str(file),
            "input_sha256": file_sha256(file), "dtype": dtype, "architectures": config.get("architectures"),
            "model_type": config.get("model_type"), "tie_word_embeddings": config.get("tie_word_embeddings"),
            "parameters": sum(p.numel() for p in model.parameters()), "output": str(target.output),
        }
        (tmp / REPORT_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load(file: Path, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = file.parent, file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise MultiflowError(f"transformers cannot read {file}: {str(exc).splitlines()[0] if str(exc) else exc}"
                             ) from exc
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point() or p.dtype != dtype]
    if packed:
        raise MultiflowError(f"{file}: parameter {packed[0]} is still packed after dequantization "
                             f"({len(packed)} such); this transformers version cannot convert the file")
    # The weights are plain tensors now: drop the quantizer so that save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    with torch.no_grad():
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise MultiflowError(f"{file}: weight {bad} holds NaN or inf after dequantization to {dtype}; "
                             "try --dtype float32")
    return model, tokenizer

