"""Calibration samples: every data format end to end, the bundled set, image modes, skips and errors."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multiflow.calibration import bundled as bundled_data
from multiflow.calibration import data as calibration_data
from multiflow.calibration.data import DataReport, describe_bundled, load_samples, to_rgb
from multiflow.errors import MultiflowError

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10), (10, 200, 200), (200, 10, 200)]


def shuffled(n: int, seed: int) -> list[int]:
    """The documented sampling order: random.Random(seed).shuffle of the candidate indices."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def write_image(path: Path, colour=(200, 10, 10), size=(8, 6), mode="RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def pixel(sample) -> tuple[int, int, int]:
    return sample.image.getpixel((0, 0))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "multiflow" and r.levelno == logging.WARNING]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    yield


# --- JSON / JSONL --------------------------------------------------------------------------------

def test_json_list_of_records(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    records = [
        {"image": "imgs/a.png", "question": "Q0?", "answer": "A0"},
        {"image": "imgs/b.jpg", "question": "  Q1?\n"},  # no answer; whitespace stripped
        {"image": str(write_image(folder / "c.png", COLOURS[2])), "question": "Q2?", "answer": "A2"},  # absolute
    ]
    write_image(folder / "a.png", COLOURS[0])
    Image.new("RGB", (16, 12), COLOURS[1]).save(folder / "b.jpg", quality=100)
    (tmp_path / "data.json").write_text(json.dumps(records))

    samples, report = load_samples(tmp_path / "data.json", nsamples=3, seed=7)

    order = shuffled(3, 7)
    expected = [("data.json[0]", "Q0?", "A0"), ("data.json[1]", "Q1?", None), ("data.json[2]", "Q2?", "A2")]
    assert [(s.source, s.question, s.answer) for s in samples] == [expected[i] for i in order]
    by_source = {s.source: s for s in samples}
    assert pixel(by_source["data.json[0]"]) == COLOURS[0]
    assert pixel(by_source["data.json[2]"]) == COLOURS[2]
    assert by_source["data.json[1]"].image.size == (16, 12)
    assert all(s.image.mode == "RGB" for s in samples)
    assert report == DataReport(str(tmp_path / "data.json"), "json", 3, 3, [], 3, 0)


def test_jsonl_counts_records_without_image(tmp_path, caplog):
    write_image(tmp_path / "a.png", COLOURS[0])
    write_image(tmp_path / "b.png", COLOURS[1])
    lines = [
        json.dumps({"image": "a.png", "question": "first?", "answer": "one"}),
        "",
        json.dumps({"question": "text only?", "answer": "no image"}),
        json.dumps({"image": "b.png", "question": "second?", "answer": "two"}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.INFO, logger="multiflow"):
        samples, report = load_samples(tmp_path / "data.jsonl", nsamples=2, seed=0)

    expected = [("data.jsonl:1", "first?", "one", COLOURS[0]), ("data.jsonl:4", "second?", "two", COLOURS[1])]
    assert [(s.source, s.question, s.answer, pixel(s)) for s in samples] == [expected[i] for i in shuffled(2, 0)]
    assert (report.kind, report.available, report.used, report.without_image, report.skipped) == ("jsonl", 2, 2, 1, [])
    assert warnings_of(caplog) == []
    assert any("1 record(s) without an image" in r.getMessage() for r in caplog.records)


def test_llava_conversations(tmp_path):
    write_image(tmp_path / "cat.png", COLOURS[0])
    write_image(tmp_path / "cup.png", COLOURS[1])
    records = [
        {"id": "1", "image": "cat.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Brown."}]},
        {"id": "2", "image": "cup.png", "conversations": [
            {"from": "human", "value": "What is in the cup?\n<image>"},
            {"from": "gpt", "value": "Coffee."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))

    samples, report = load_samples(tmp_path / "llava.json", nsamples=5, seed=0)

    assert sorted((s.source, s.question, s.answer, pixel(s)) for s in samples) == [
        ("llava.json[0]", "What animal is this?", "A cat.", COLOURS[0]),
        ("llava.json[1]", "What is in the cup?", "Coffee.", COLOURS[1]),
    ]
    assert (report.kind, report.available, report.used, report.without_image) == ("llava-json", 2, 2, 1)


def test_record_of_neither_format_is_an_error(tmp_path):
    write_image(tmp_path / "a.png")
    records = [{"image": "a.png", "question": "ok?"}, {"image": "a.png", "description": "a red square"}]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(MultiflowError, match=r"bad\.json record \[1\]: keys \['description', 'image'\]; expected "
                                             r"'image' with 'question'.*'conversations'.*'caption'"):
        load_samples(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "ok?"}\n["a.png", "q"]\n')
    with pytest.raises(MultiflowError, match=r"bad\.jsonl line 2: a list, expected an object"):
        load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "question": "ok?"}\n{"image": \n')
    with pytest.raises(MultiflowError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_samples(tmp_path / "broken.jsonl")


def test_image_folder_resolves_relative_paths(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    write_image(images / "x.png", COLOURS[3])
    (tmp_path / "data.json").write_text(json.dumps([{"image": "x.png", "question": "Q?"}]))
    samples, _ = load_samples(tmp_path / "data.json", nsamples=1, image_folder=images)
    assert [(s.source, pixel(s)) for s in samples] == [("data.json[0]", COLOURS[3])]


# --- datasets.save_to_disk and parquet ----------------------------------------------------------

def image_dataset(columns: dict, n_images: int, image_name: str = "image"):
    import datasets

    images = [Image.new("RGB", (8, 6), COLOURS[i]) for i in range(n_images)]
    features = {image_name: datasets.Image()}
    for name, values in columns.items():
        features[name] = (datasets.Sequence(datasets.Value("string")) if isinstance(values[0], list)
                          else datasets.Value("string"))
    return datasets.Dataset.from_dict({image_name: images, **columns}, features=datasets.Features(features))


def test_save_to_disk_question_answer(tmp_path):
    folder = tmp_path / "vqa"
    image_dataset({"question": ["Q0?", "Q1?", "Q2?"], "answer": ["A0", "A1", "A2"]}, 3).save_to_disk(folder)

    samples, report = load_samples(folder, nsamples=3, seed=3)

    expected = [(f"vqa[{i}]", f"Q{i}?", f"A{i}", COLOURS[i]) for i in range(3)]
    assert [(s.source, s.question, s.answer, pixel(s)) for s in samples] == [expected[i] for i in shuffled(3, 3)]
    assert (report.source, report.kind, report.available, report.used) == (str(folder), "hf-disk", 3, 3)


def test_save_to_disk_questions_answers_lists(tmp_path):
    folder = tmp_path / "ocr-vqa"
    image_dataset({"questions": [["Who wrote it?", "What is the title?", "Is it a novel?"], ["What genre?"]],
                   "answers": [["Jane Doe", "Stars", "Yes"], ["Cooking"]]}, 2).save_to_disk(folder)

    samples, report = load_samples(folder, nsamples=4, seed=1)

    expected = [("ocr-vqa[0]#q0", "Who wrote it?", "Jane Doe", COLOURS[0]),
                ("ocr-vqa[0]#q1", "What is the title?", "Stars", COLOURS[0]),
                ("ocr-vqa[0]#q2", "Is it a novel?", "Yes", COLOURS[0]),
                ("ocr-vqa[1]#q0", "What genre?", "Cooking", COLOURS[1])]
    assert [(s.source, s.question, s.answer, pixel(s)) for s in samples] == [expected[i] for i in shuffled(4, 1)]
    assert (report.kind, report.available, report.used) == ("hf-disk", 4, 4)


def test_dataset_dict_uses_train_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "test": image_dataset({"question": ["test Q?"]}, 1),
        "train": image_dataset({"question": ["train Q0?", "train Q1?"]}, 2),
    }).save_to_disk(folder)

    samples, report = load_samples(folder, nsamples=2)

    assert sorted((s.source, s.question, s.answer) for s in samples) == [
        ("dd[0]", "train Q0?", None), ("dd[1]", "train Q1?", None)]
    assert report.source == f"{folder} (split 'train' of test, train)"


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_file_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    image_dataset({"question": ["Q0?", "Q1?"], "answer": ["A0", "A1"]}, 2).to_parquet(
        str(data / "train-00000-of-00002.parquet"))
    # The second shard is written by pyarrow alone (no datasets metadata), two rows a row group.
    table = pa.table({
        "image": [{"bytes": png_bytes(COLOURS[i]), "path": None} for i in range(2, 6)],
        "question": ["Q2?", "Q3?", "Q4?", "Q5?"],
        "answer": ["A2", "A3", "A4", "A5"],
    })
    pq.write_table(table, data / "train-00001-of-00002.parquet", row_group_size=2)
    image_dataset({"question": ["test?"], "answer": ["no"]}, 1).to_parquet(str(data / "test-00000.parquet"))

    single, report = load_samples(data / "train-00000-of-00002.parquet", nsamples=2, seed=0)
    assert sorted((s.source, s.question, s.answer, pixel(s)) for s in single) == [
        ("train-00000-of-00002.parquet[0]", "Q0?", "A0", COLOURS[0]),
        ("train-00000-of-00002.parquet[1]", "Q1?", "A1", COLOURS[1])]
    assert (report.source, report.kind, report.available) == (str(data / "train-00000-of-00002.parquet"), "parquet", 2)

    samples, report = load_samples(data, nsamples=6, seed=5)
    expected = [("train-00000-of-00002.parquet[0]", "Q0?", "A0", COLOURS[0]),
                ("train-00000-of-00002.parquet[1]", "Q1?", "A1", COLOURS[1])] + [
                (f"train-00001-of-00002.parquet[{i}]", f"Q{i + 2}?", f"A{i + 2}", COLOURS[i + 2]) for i in range(4)]
    assert [(s.source, s.question, s.answer, pixel(s)) for s in samples] == [expected[i] for i in shuffled(6, 5)]
    assert report.source == f"{data} (2 parquet file(s) of the train split, of 3)"
    assert (report.kind, report.available, report.used) == ("parquet", 6, 6)


def test_parquet_image_struct_column_and_question_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["a", "b", "c"],
        "picture": [{"bytes": png_bytes(COLOURS[i]), "path": None} for i in range(3)],
        "questions": [["Title?", "Author?"], [], ["Genre?"]],
        "answers": [["Stars", "Jane Doe"], [], ["Cooking"]],
    })
    pq.write_table(table, tmp_path / "books.parquet", row_group_size=1)

    samples, report = load_samples(tmp_path / "books.parquet", nsamples=3, seed=2)

    expected = [("books.parquet[0]#q0", "Title?", "Stars", COLOURS[0]),
                ("books.parquet[0]#q1", "Author?", "Jane Doe", COLOURS[0]),
                ("books.parquet[2]#q0", "Genre?", "Cooking", COLOURS[2])]
    assert [(s.source, s.question, s.answer, pixel(s)) for s in samples] == [expected[i] for i in shuffled(3, 2)]
    assert (report.kind, report.available, report.used) == ("parquet", 3, 3)


def test_wrong_columns_are_listed(tmp_path):
    import datasets

    folder = tmp_path / "captions"
    datasets.Dataset.from_dict({"img_path": ["a.png"], "caption": ["a red square"]}).save_to_disk(folder)
    with pytest.raises(MultiflowError, match=r"captions: columns found: img_path, caption; expected an image "
                                             r"column \('image' or a datasets.Image feature\) with 'question'"):
        load_samples(folder)
    no_text = tmp_path / "images-only"
    image_dataset({"label": ["cat"]}, 1).save_to_disk(no_text)
    with pytest.raises(MultiflowError, match=r"columns found: image, label; expected"):
        load_samples(no_text)


def test_empty_dataset_is_an_error(tmp_path):
    import datasets

    folder = tmp_path / "empty"
    datasets.Dataset.from_dict({"image": [], "question": []}, features=datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string")})).save_to_disk(folder)
    with pytest.raises(MultiflowError, match=r"no sample in --data .*empty: it holds no record"):
        load_samples(folder)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(MultiflowError, match=r"no sample in --data .*empty\.json: it holds no record"):
        load_samples(tmp_path / "empty.json")
    (tmp_path / "text-only.jsonl").write_text('{"question": "q?"}\n{"question": "r?"}\n')
    with pytest.raises(MultiflowError, match=r"text-only\.jsonl: none of its 2 records has an image"):
        load_samples(tmp_path / "text-only.jsonl")


# --- the bundled set ----------------------------------------------------------------------------

def test_bundled_default_is_deterministic():
    samples, report = load_samples(None, nsamples=10, seed=0)
    again, _ = load_samples(None, nsamples=10, seed=0)
    other, _ = load_samples(None, nsamples=10, seed=1)

    candidates = [(f"bundled:{im.name}#q{i}", q, a) for im in bundled_data.BUNDLED_IMAGES
                  for i, (q, a) in enumerate(im.qa)]
    first_ten = shuffled(len(candidates), 0)[:10]
    assert [(s.source, s.question, s.answer) for s in samples] == [candidates[i] for i in first_ten]
    assert len(samples) == 10 and all(s.image.mode == "RGB" for s in samples)
    assert [(s.source, s.image.tobytes()) for s in samples] == [(s.source, s.image.tobytes()) for s in again]
    assert [s.source for s in other] != [s.source for s in samples]
    assert (report.kind, report.available, report.used, report.skipped) == ("bundled", len(candidates), 10, [])


def test_every_bundled_image_loads_offline_and_is_described():
    total = sum(len(im.qa) for im in bundled_data.BUNDLED_IMAGES)
    samples, report = load_samples(None, nsamples=total, seed=0)
    assert report.skipped == [] and len(samples) == total
    assert all(min(s.image.size) >= 100 for s in samples)
    chelsea = next(s for s in samples if s.source == "bundled:chelsea#q0")
    assert (chelsea.question, chelsea.answer, chelsea.image.size) == ("What animal is this?", "A cat.", (451, 300))
    text = describe_bundled()
    for image in bundled_data.BUNDLED_IMAGES:
        assert f"{image.name} ({image.package}, {image.licence})" in text
    assert all(3 <= len(im.qa) <= 5 or im.name in ("grass", "gravel") for im in bundled_data.BUNDLED_IMAGES)


# --- image modes --------------------------------------------------------------------------------

def test_mode_conversions():
    grey = to_rgb(Image.new("L", (3, 2), 77))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)

    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)

    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    converted = to_rgb(rgba)  # composited onto white
    assert [converted.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]

    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    assert [to_rgb(wide).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]

    floats = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))  # outside 0..255: stretched
    assert [to_rgb(floats).getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_modes_from_files_end_to_end(tmp_path):
    write_image(tmp_path / "l.png", 50, mode="L")
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    write_image(tmp_path / "rgba.png", (0, 0, 255, 0), mode="RGBA")
    Image.fromarray(np.full((6, 8), 257 * 40, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    names = ["l.png", "p.png", "rgba.png", "i16.png"]
    (tmp_path / "modes.json").write_text(json.dumps([{"image": n, "question": n} for n in names]))

    samples, _ = load_samples(tmp_path / "modes.json", nsamples=4)

    assert {s.question: (s.image.mode, pixel(s)) for s in samples} == {
        "l.png": ("RGB", (50, 50, 50)), "p.png": ("RGB", (10, 20, 30)),
        "rgba.png": ("RGB", (255, 255, 255)), "i16.png": ("RGB", (40, 40, 40))}


# --- skips, shortfalls and errors ---------------------------------------------------------------

def test_unusable_images_are_skipped_counted_and_named(tmp_path, caplog):
    write_image(tmp_path / "good0.png", COLOURS[0])
    write_image(tmp_path / "good1.png", COLOURS[1])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    write_image(tmp_path / "dot.png", size=(1, 1))
    names = ["good0.png", "missing.png", "corrupt.png", "dot.png", "good1.png"]
    (tmp_path / "data.json").write_text(json.dumps([{"image": n, "question": n} for n in names]))

    seed = next(s for s in range(100) if shuffled(5, s)[-1] in (0, 4))  # every bad image comes up before 2 good
    with caplog.at_level(logging.INFO, logger="multiflow"):
        samples, report = load_samples(tmp_path / "data.json", nsamples=2, seed=seed)

    assert sorted(s.question for s in samples) == ["good0.png", "good1.png"]
    assert (report.available, report.used, report.requested) == (5, 2, 2)
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["data.json[1]", "data.json[2]", "data.json[3]"]
    assert reasons["data.json[1]"] == f"missing file: {tmp_path / 'missing.png'}"
    assert reasons["data.json[2]"].startswith("unreadable image: ")
    assert reasons["data.json[3]"] == "degenerate image: 1x1 px (a side under 2)"
    [warning] = warnings_of(caplog)  # exactly one warning: the skips; nothing short
    assert warning.startswith(f"skipped 3 calibration sample(s) in {tmp_path / 'data.json'} (")
    for source in reasons:
        assert source in warning
    assert "1 missing file" in warning and "1 unreadable image" in warning and "1 degenerate image" in warning


def test_warning_names_five_and_counts_the_rest(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    records = [{"image": f"gone{i}.png", "question": "q?"} for i in range(8)]
    records.append({"image": "good.png", "question": "g?"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="multiflow"):
        samples, report = load_samples(tmp_path / "data.json", nsamples=9)
    assert [s.question for s in samples] == ["g?"]
    assert len(report.skipped) == 8
    skip_warning, short_warning = warnings_of(caplog)
    assert skip_warning.count("(missing file: ") == 5 and skip_warning.endswith(" and 3 more")
    assert short_warning == f"asked for 9 calibration samples, found 1 usable in {tmp_path / 'data.json'}: using all 1"


def test_more_samples_asked_than_data_has(tmp_path, caplog):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", COLOURS[i])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "question": f"q{i}"}) + "\n"
                                              for i in range(3)))
    with caplog.at_level(logging.WARNING, logger="multiflow"):
        samples, report = load_samples(tmp_path / "d.jsonl", nsamples=10, seed=4)
    assert [s.question for s in samples] == [f"q{i}" for i in shuffled(3, 4)]
    assert (report.available, report.used, report.requested) == (3, 3, 10)
    assert warnings_of(caplog) == [f"asked for 10 calibration samples, found 3 usable in {tmp_path / 'd.jsonl'}: "
                                   f"using all 3"]


def test_smaller_request_is_a_prefix_and_images_are_decoded_lazily(tmp_path, monkeypatch):
    for i in range(6):
        write_image(tmp_path / f"{i}.png", COLOURS[i])
    (tmp_path / "d.json").write_text(json.dumps([{"image": f"{i}.png", "question": f"q{i}"} for i in range(6)]))
    opened: list[str] = []
    real_open = calibration_data._open_image
    monkeypatch.setattr(calibration_data, "_open_image", lambda file: opened.append(str(file)) or real_open(file))

    two, _ = load_samples(tmp_path / "d.json", nsamples=2, seed=9)
    assert len(opened) == 2
    five, _ = load_samples(tmp_path / "d.json", nsamples=5, seed=9)
    assert [s.source for s in five[:2]] == [s.source for s in two]
    assert [s.question for s in five] == [f"q{i}" for i in shuffled(6, 9)[:5]]


def test_no_usable_sample_is_an_error(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "d.json").write_text(json.dumps([{"image": "nothere.png", "question": "a"},
                                                 {"image": "corrupt.jpg", "question": "b"},
                                                 {"image": "alsogone.png", "question": "c"}]))
    with pytest.raises(MultiflowError, match=r"no usable sample in --data .*d\.json: 3 skipped "
                                             r"\(2 missing file, 1 unreadable image\)"):
        load_samples(tmp_path / "d.json", nsamples=2)


@pytest.mark.parametrize("nsamples", [0, -3])
def test_nsamples_below_one_is_an_error(nsamples):
    with pytest.raises(MultiflowError, match=rf"nsamples {nsamples}: ask for at least 1"):
        load_samples(None, nsamples=nsamples)


def test_unknown_inputs_name_the_path_and_the_formats(tmp_path):
    with pytest.raises(MultiflowError, match=r"--data .*nowhere\.json not found; accepted: a \.json"):
        load_samples(tmp_path / "nowhere.json")
    (tmp_path / "data.csv").write_text("image,question\n")
    with pytest.raises(MultiflowError, match=r"data\.csv: unknown format '\.csv'; accepted: "):
        load_samples(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MultiflowError, match=r"folder: no dataset in this folder .*; accepted: "):
        load_samples(tmp_path / "folder")
    (tmp_path / "object.json").write_text('{"image": "a.png"}')
    with pytest.raises(MultiflowError, match=r"object\.json: holds a dict, expected a list of records"):
        load_samples(tmp_path / "object.json")
