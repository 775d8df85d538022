"""A checkpoint's processor (tokenizer + image processor) without the optional packages transformers may want.

transformers 5 builds the processors of Qwen2/2.5/3-VL, SmolVLM, InternVL, LLaVA-OneVision and others with a
video processor, and its video processors need torchvision (a build matching the installed torch). multiflow
feeds images and text only: without torchvision the processor is built without its video processor (its
image processor falls back to transformers' PIL/numpy one by itself). Any other missing package (SmolVLM's
num2words) is a one-line error naming the package and the pip command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from multiflow.errors import MultiflowError

# Optional packages a processor may import, with what installs them.
INSTALL = {
    "torchvision": "pip install torchvision (the build that matches your torch: see pytorch.org)",
    "num2words": "pip install num2words",
    "sentencepiece": "pip install sentencepiece",
    "tiktoken": "pip install tiktoken",
    "protobuf": "pip install protobuf",
    "timm": "pip install timm",
    "einops": "pip install einops",
}
# Import names that are not the package's name on PyPI.
PACKAGE_OF_MODULE = {"google": "protobuf", "PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn"}
_CONFIGS = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def missing_package(exc: ImportError) -> str | None:
    """The package an ImportError says is missing: that of its module `name`, or the first known package its
    message names (transformers' "X requires the Torchvision library" has no name)."""
    if exc.name:
        module = exc.name.split(".")[0]
        return PACKAGE_OF_MODULE.get(module, module)
    text = str(exc).lower()
    found = [(text.find(name), name) for name in INSTALL if name in text]
    if found:
        return min(found)[1]
    match = re.search(r"requires the (\w+) library", str(exc))
    return match.group(1).lower() if match else None


def missing_package_error(exc: ImportError, folder: Path, what: str = "processor") -> MultiflowError:
    package = missing_package(exc)
    if package is None:
        first = " ".join(str(exc).split())[:200]
        return MultiflowError(f"the {what} of {folder} cannot be built: {first}")
    install = INSTALL.get(package, f"pip install {package}")
    return MultiflowError(f"the {what} of {folder} needs the Python package {package}, which is not installed: "
                          f"{install}")


def load_processor(folder: Path, trust_remote_code: bool = False) -> Any:
    """AutoProcessor's processor of `folder`; without torchvision, the same processor without its video
    processor (images and text only); a missing optional package is a one-line MultiflowError."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        load = AutoProcessor.from_pretrained
        if not is_torchvision_available():
            processor_class = _processor_class(folder)  # transformers' stand-in raises if it needs torchvision
            if processor_class is not None and any("video" in a for a in processor_class.get_attributes()):
                try:
                    load = without_videos(processor_class).from_pretrained
                except ValueError:
                    pass  # AutoProcessor's own error names the missing package
        return load(folder, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise missing_package_error(exc, folder) from None


class NoVideoProcessor:
    """Stands where a processor keeps its video processor when torchvision is missing: the video settings that
    its image-and-text code reads (SmolVLM's chat template reads the frame count and rate) are unset, and a
    video is refused."""

    num_frames = None
    fps = None

    def __call__(self, *args, **kwargs):
        raise MultiflowError(f"videos need the Python package torchvision, which is not installed: "
                             f"{INSTALL['torchvision']}")


def without_videos(processor_class: type) -> type:
    """`processor_class` with its video processor left out: neither loaded nor checked (its __init__ gets None
    for it), so a processor of images and text is built without torchvision; `from_pretrained` puts a
    `NoVideoProcessor` in its place. The video processors of transformers' processors come after their other
    parts, as this needs."""
    every = processor_class.get_attributes()
    kept = [a for a in every if "video" not in a]
    left_out = [a for a in every if "video" in a]
    if every[: len(kept)] != kept:
        raise ValueError(f"{processor_class.__name__}: its video processor is not its last part")

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        made = super(cls, cls).from_args_and_dict([*args, *[None] * len(left_out)], processor_dict, **kwargs)
        for attribute in left_out:
            setattr(made[0] if isinstance(made, tuple) else made, attribute, NoVideoProcessor())
        return made

    return type(processor_class.__name__, (processor_class,), {
        "from_args_and_dict": from_args_and_dict,
        "get_attributes": classmethod(lambda cls: list(kept)),
        "__module__": processor_class.__module__,
        "__doc__": f"{processor_class.__name__} without its video processor (torchvision is not installed).",
    })


def _processor_class(folder: Path) -> type | None:
    """The processor class that AutoProcessor would build for `folder` (transformers' own classes only)."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    for name in _CONFIGS:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("processor_class"), str):
            found = processor_class_from_name(data["processor_class"])
            if found is not None:
                return found
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    return PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None
