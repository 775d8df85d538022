"""A `datasets.save_to_disk` folder opened as one dataset: a DatasetDict's preferred split, else its first.
Shared by the image-text data (data.py) and the plain-text data (text_data.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multiflow.errors import MultiflowError


def open_saved_dataset(path: Path, preferred: tuple[str, ...], accepted: str, empty: str) -> tuple[Any, str]:
    """(the dataset, its source label naming the split). `accepted` ends the message of an unreadable folder;
    `empty` starts the message of a DatasetDict without splits ("no sample in --data", "no text in")."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, pyarrow errors...
        raise MultiflowError(f"{path}: cannot read this datasets.save_to_disk folder ({type(error).__name__}: "
                             f"{error}); {accepted}") from None
    source = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if not names:
            raise MultiflowError(f"{empty} {path}: the DatasetDict has no split")
        split = next((s for s in preferred if s in loaded), names[0])
        loaded = loaded[split]
        source = f"{path} (split '{split}' of {', '.join(names)})"
    return loaded, source
