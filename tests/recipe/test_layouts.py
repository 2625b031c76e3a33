"""The layouts users already have (recipe/layouts.py, recipe/dataset_layouts.py) and the own-data script
(finetune_hf_trainer_custom.py): the same examples written in every layout give the same ids,
labels and pixels; bad records stop the run with file:line; the script names its task in all it
writes, scores with each --metric, trains on a saved HF dataset offline and on two ranks."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import jinja2
import pytest
import torch
from PIL import Image

import finetune_hf_trainer_custom as custom
import finetune_hf_trainer_ucf101 as ucf101
from data_samples import good_record, image, make_processor, write_jsonl
from phi3v.processing_phi3v import image_tag
from recipe.data import ConversationDataset
from recipe.dataset_layouts import dataset_conversations
from recipe.errors import DataError, FlagError, cli
from recipe.layouts import detect_layout, load_file, load_jsonl, main as convert, read_file, resolve_image_path, to_ours

LAUNCHER = Path(__file__).with_name("distributed_launcher.py")


@dataclass(frozen=True)
class Img:
    name: str


A, B, C = Img("a.png"), Img("b.png"), Img("sub/c.png")
SIZES = {A: (200, 120, (220, 30, 30)), B: (90, 160, (30, 200, 30)), C: (150, 150, (30, 30, 210))}

# (id, system, [(user parts, answer), ...]): a part is text or an image, in the order the user wrote them.
EXAMPLES = [
    ("one-image", "", [([A, "What colour is this?"], "red")]),
    ("system", "You are a terse assistant.", [([B, "Describe it."], "a green bar")]),
    ("two-images", "", [([A, B, "Which one is taller?"], "the second")]),
    ("text-only", "", [(["What is 2+2?"], "4")]),
    ("mid-turn", "", [(["Compare this", A, "with this one:", C], "different colours")]),
    ("later-turn", "", [(["Hello"], "Hi"), ([C, "And this?"], "blue")]),
    ("multi-turn", "", [([A, "Colour?"], "red"), (["Shape?"], "a rectangle")]),
    ("system-mid-later", "Answer briefly.", [(["Look:", B], "ok"), (["Now", A, "?"], "red")]),
]


def images_of(turns):
    return [p for parts, _ in turns for p in parts if isinstance(p, Img)]


def text(parts, placeholder):
    return "\n".join(placeholder if isinstance(p, Img) else p for p in parts)


def as_ours(example):
    """Our layout: each turn's own images; image-first turns without tags (ours puts them there),
    the others with `<|image_k|>` tags numbered across the conversation."""
    id_, system, turns = example
    out, k = [], 0
    for parts, answer in turns:
        images = [p for p in parts if isinstance(p, Img)]
        leading = images and len(parts) == len(images) + 1 and all(isinstance(p, Img) for p in parts[:-1])
        numbered = []
        for p in parts:
            if isinstance(p, Img):
                k += 1
                numbered.append(image_tag(k))
            else:
                numbered.append(p)
        user = parts[-1] if leading else "\n".join(numbered)
        out.append({"images": [p.name for p in images], "user": user, "assistant": answer})
    return {"id": id_, **({"system": system} if system else {}), "conversations": out}


def as_llava(example):
    id_, system, turns = example
    images = [p.name for p in images_of(turns)]
    conv = [{"from": "system", "value": system}] if system else []
    for parts, answer in turns:
        conv += [{"from": "human", "value": text(parts, "<image>")}, {"from": "gpt", "value": answer}]
    return {"id": id_, **({"image": images[0] if len(images) == 1 else images} if images else {}),
            "conversations": conv}


def as_messages(example, typed=False, image_value=lambda img: img.name, inline=False):
    """inline: OpenAI's typed parts, each image part naming its file (no record-level images)."""
    id_, system, turns = example
    system_content = [{"type": "text", "text": system}] if typed else system
    messages = [{"role": "system", "content": system_content}] if system else []

    def image_part(img):
        return {"type": "image_url", "image_url": {"url": img.name}} if inline else {"type": "image"}

    for parts, answer in turns:
        if typed:
            content = [image_part(p) if isinstance(p, Img) else {"type": "text", "text": p} for p in parts]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        else:
            messages += [{"role": "user", "content": text(parts, "<image>")}, {"role": "assistant", "content": answer}]
    if inline:
        return {"id": id_, "messages": messages}
    return {"id": id_, "messages": messages, "images": [image_value(p) for p in images_of(turns)]}


def as_cauldron(example):
    id_, _, turns = example
    return {"images": [p.name for p in images_of(turns)],
            "texts": [{"user": text(parts, "<image>"), "assistant": answer} for parts, answer in turns]}


def pil(img: Img) -> Image.Image:
    w, h, color = SIZES[img]
    return Image.new("RGB", (w, h), color)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    (root / "sub").mkdir()
    for img in SIZES:
        pil(img).save(root / img.name)
    return root


def write(path: Path, records, as_list=False) -> Path:
    if as_list:  # one JSON list, pretty-printed: records start on later lines
        path.write_text(json.dumps(records, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def processor():
    return make_processor(num_crops=1)


def encoded(conversations, processor):
    dataset = ConversationDataset(conversations, processor)
    return [dataset[i] for i in range(len(dataset))]


def assert_same(items, reference, what):
    assert len(items) == len(reference), what
    for got, want in zip(items, reference):
        assert got.keys() == want.keys(), (what, got["id"])
        for key in ("input_ids", "labels", "pixel_values", "image_sizes"):
            if key in want:
                assert torch.equal(got[key], want[key]), (what, want["id"], key)


# -- the same examples in every layout ---------------------------------------------------------------


def test_every_layout_gives_the_same_ids_labels_and_pixels(data_dir, processor):
    writers = {
        "ours": (as_ours, False), "llava": (as_llava, True), "messages": (as_messages, False),
        "messages-typed": (lambda e: as_messages(e, typed=True), True),
        "messages-openai": (lambda e: as_messages(e, typed=True, inline=True), False),
    }
    results = {}
    for name, (writer, as_list) in writers.items():
        path = write(data_dir / f"{name}.{'json' if as_list else 'jsonl'}", [writer(e) for e in EXAMPLES], as_list)
        conversations = load_file(path, data_dir)
        assert not conversations.problems, (name, conversations.problems)
        assert [c.id for c in conversations] == [e[0] for e in EXAMPLES]
        results[name] = encoded(conversations, processor)
    for name in writers:
        assert_same(results[name], results["ours"], name)
    # the_cauldron cannot say "system": the other six
    plain = [e for e in EXAMPLES if not e[1]]
    cauldron = load_file(write(data_dir / "cauldron.jsonl", [as_cauldron(e) for e in plain]), data_dir)
    wanted = [item for item, e in zip(results["ours"], EXAMPLES) if not e[1]]
    assert_same(encoded(cauldron, processor), wanted, "cauldron")
    # A Hugging Face dataset with embedded images (TRL's messages/images columns).
    rows = [as_messages(e, typed=True, image_value=pil) for e in EXAMPLES]
    dataset = datasets.Dataset.from_list(rows)
    assert isinstance(dataset.features["images"].feature, datasets.Image)
    dataset.save_to_disk(str(data_dir / "hf"))
    hf = dataset_conversations(datasets.load_from_disk(str(data_dir / "hf")), "train")
    assert not hf.problems and [c.where for c in hf][:2] == ["train row 0", "train row 1"]
    assert_same(encoded(hf, processor), results["ours"], "hf dataset")
    cauldron_rows = [{**as_cauldron(e), "images": [pil(p) for p in images_of(e[2])]} for e in plain]
    hf_cauldron = dataset_conversations(datasets.Dataset.from_list(cauldron_rows), "train")
    assert not hf_cauldron.problems and len(hf_cauldron) == len(plain)
    assert_same(encoded(hf_cauldron, processor), wanted, "hf cauldron dataset")
    # The ucf101 script reads its --train_file/--eval_file through the same readers.
    llava = data_dir / "llava.json"
    args = ucf101.Ucf101Arguments(train_file=str(llava), eval_file=str(llava), image_dir=str(data_dir))
    args.check()
    train, _ = ucf101.load_data(args, None)
    assert_same(encoded(train, processor), results["ours"], "ucf101 script")

    # The placements are really different: the mid-turn image after its text, the later-turn
    # image in the second user turn, the system message first through the release's template.
    ours = {e[0]: item for e, item in zip(EXAMPLES, results["ours"])}
    first_image = lambda item: item["input_ids"].tolist().index(-1)  # noqa: E731
    assert first_image(ours["mid-turn"]) > first_image(ours["one-image"]) + 3
    later = ours["later-turn"]["input_ids"].tolist()
    user = processor.tokenizer.convert_tokens_to_ids("<|user|>")
    assert later.index(-1) > [i for i, t in enumerate(later) if t == user][1]
    # The system message as the release's own chat template renders it.
    release = Path(__file__).parents[1] / "fixtures" / "release" / "phi-3.5-vision-instruct" / "tokenizer_config.json"
    messages = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    released = jinja2.Template(json.loads(release.read_text())["chat_template"]).render(messages=messages)
    tokenizer = processor.tokenizer
    assert tokenizer.apply_chat_template(messages, tokenize=False) == released
    system_prefix = tokenizer(released[: released.index("<|user|>")])["input_ids"]
    assert ours["system"]["input_ids"].tolist()[: len(system_prefix)] == system_prefix
    assert ours["system"]["labels"][: len(system_prefix)].eq(-100).all()


def test_a_messages_dataset_with_an_image_column(data_dir, processor):
    """One image per row in an `image` column (not `images`): read as the record's image, not
    dropped (a row without placeholders would otherwise train text-only)."""
    plain = [e for e in EXAMPLES if len(images_of(e[2])) == 1 and not e[1]]
    dataset = datasets.Dataset.from_list(
        [{"messages": as_messages(e)["messages"], "image": pil(images_of(e[2])[0])} for e in plain])
    found = dataset_conversations(dataset, "train")
    assert not found.problems and [len(c.images) for c in found] == [1] * len(plain)
    ours = load_file(write(data_dir / "one-image.jsonl", [as_ours(e) for e in plain]), data_dir)
    assert_same(encoded(found, processor), encoded(ours, processor), "messages + image column")
    # Text-only rows (a null image) carry no image, in both column forms.
    mixed = [{"messages": as_messages(EXAMPLES[0])["messages"], "image": pil(A)},
             {"messages": as_messages(EXAMPLES[3])["messages"], "image": None}]
    found = dataset_conversations(datasets.Dataset.from_list(mixed), "train")
    assert not found.problems and [len(c.images) for c in found] == [1, 0]
    llava = datasets.Dataset.from_list([{**as_llava(EXAMPLES[3]), "image": None},
                                        {**as_llava(EXAMPLES[0]), "image": pil(A)}]).select([1, 0])
    assert [len(c.images) for c in dataset_conversations(llava, "train")] == [1, 0]
    no_placeholder = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Colour?"},
                                                               {"role": "assistant", "content": "red"}],
                                                  "image": pil(A)}])
    assert len(dataset_conversations(no_placeholder, "train")[0].images) == 1


def test_eval_only_on_a_dataset_with_only_its_eval_split(tmp_path):
    rows = [as_messages(e, typed=True, image_value=pil) for e in EXAMPLES[:2]]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    args = custom.CustomArguments(dataset_name_or_path=str(tmp_path / "hf"), eval_only=True)
    args.check()
    train, eval_ = custom.load_data(args, None)
    assert train is None and len(eval_) == 2
    with pytest.raises(DataError, match="not --train_split 'train'"):
        custom.load_data(custom.CustomArguments(dataset_name_or_path=str(tmp_path / "hf")), None)


def test_a_file_saved_with_a_byte_order_mark(tmp_path):
    """Editors on Windows save UTF-8 with a BOM: read as the same records, in both file forms."""
    records = [as_messages(EXAMPLES[3]), as_messages(EXAMPLES[3])]
    for as_list in (True, False):
        path = write(tmp_path / "bom.json", records, as_list)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        found = load_file(path, tmp_path)
        assert not found.problems and len(found) == 2, found.problems


def test_a_dataset_of_image_paths_is_refused(data_dir):
    """Paths in a dataset column would be opened relative to the working directory, absolute and
    `..` paths included (no --image_dir, no path check): refused, pointing to --train_file."""
    rows = [as_messages(EXAMPLES[0]), {**as_messages(EXAMPLES[0]), "images": ["../../etc/hosts"]}]
    llava = [{**as_llava(EXAMPLES[0]), "image": "/etc/hosts"}]
    for dataset, column in ((datasets.Dataset.from_list(rows), "images"), (datasets.Dataset.from_list(llava), "image")):
        with pytest.raises(DataError, match=rf"train split: the '{column}' column holds file paths.*--train_file"):
            dataset_conversations(dataset, "train")
    # Typed parts naming their file (OpenAI's image_url) in a dataset without an image column.
    named = datasets.Dataset.from_list([as_messages(EXAMPLES[0], typed=True, inline=True)])
    found = dataset_conversations(named, "train")
    assert not found and "train row 0: content: image 'a.png' is named by the row" in str(found.problems[0])


def test_convert_to_ours_round_trips(data_dir, processor, capsys):
    source = write(data_dir / "convert-llava.json", [as_llava(e) for e in EXAMPLES], as_list=True)
    out = data_dir / "converted.jsonl"
    assert convert(["--to", "ours", str(source), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [as_ours(e) for e in EXAMPLES]  # image-first turns come back without tags
    assert_same(encoded(load_file(out, data_dir), processor), encoded(load_file(source, data_dir), processor),
                "converted")
    assert to_ours(load_file(out, data_dir)[0], data_dir) == records[0]


# -- our layout: bad lines, unsafe paths, empty files -------------------------------------------


def test_our_layout_reports_each_bad_line_with_file_and_line(tmp_path):
    (tmp_path / "img").mkdir()
    image(336, 336).save(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [
        good_record(0, ["a.png"]),
        "{not json",
        {"id": "x"},
        {"conversations": [{"user": 3, "assistant": "a"}]},
        {"conversations": [{"user": "u", "asistant": "a"}]},
        {"conversations": [{"images": ["/etc/passwd"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": ["../secret.png"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": "a.png", "user": "u", "assistant": "a"}]},
    ])
    conversations, problems, _ = read_file(data, tmp_path / "img", "ours")
    assert [c.id for c in conversations] == ["ex0"]
    by_line = {}
    for p in problems:
        line = int(p.where.rsplit(":", 1)[1])
        by_line[line] = by_line.get(line, "") + p.message + "; "
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8}
    assert "invalid JSON" in by_line[2]
    assert "conversations" in by_line[3]
    assert "user must be a string" in by_line[4]
    assert "asistant" in by_line[5]
    assert "absolute" in by_line[6]
    assert "escapes" in by_line[7]
    assert "list of path strings" in by_line[8]
    assert all(str(data) in p.where for p in problems)


def test_path_traversal_refused():
    for bad in ["../x.png", "a/../../x.png", "/abs.png", ""]:
        with pytest.raises(ValueError):
            resolve_image_path(bad, "/data/images")
    assert str(resolve_image_path("a/./b/../c.png", "/data/images")) == "/data/images/a/c.png"


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_or_blank_jsonl_is_one_error_line_naming_the_file(tmp_path, capsys, content):
    data = tmp_path / "ucf101_train.jsonl"
    data.write_text(content)
    assert cli(lambda: load_jsonl(data, tmp_path / "images")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"{data} has no examples" in err


def test_bad_lines_end_in_one_error_line_with_the_problems_above(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", good_record(1, [])])
    assert cli(lambda: load_jsonl(data, tmp_path)) == 2
    *details, last = capsys.readouterr().err.splitlines()
    assert details == [f"  {data}:1: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert last.startswith(f"error: 1 problem(s) in {data} (first: {data}:1: invalid JSON")
    assert cli(lambda: load_jsonl(tmp_path / "nope.jsonl", tmp_path)) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_layout_detection_and_forcing(tmp_path):
    assert detect_layout({"conversations": [{"from": "human", "value": "x"}]}, "f:1") == "llava"
    assert detect_layout({"conversations": [{"user": "x", "assistant": "y"}]}, "f:1") == "ours"
    assert detect_layout({"messages": []}, "f:1") == "messages"
    assert detect_layout({"texts": [], "images": []}, "f:1") == "cauldron"
    with pytest.raises(DataError, match=r"f:1: .*matches no layout; closest is llava, which needs the key 'conv"):
        detect_layout({"id": 1, "image": "a.png", "conversation": []}, "f:1")
    # The layout's key present but not a list: said so, not a crash.
    for value in (None, "hello", {"from": "human"}):
        with pytest.raises(DataError, match=r"f:1: 'conversations' must be a list of turns"):
            detect_layout({"id": 1, "conversations": value}, "f:1")
    # forced: a messages record read as LLaVA says what it lacks
    path = write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}])
    found = load_file(path, tmp_path, data_format="llava")
    assert not found and "missing key 'conversations' of the llava layout" in found.problems[0].message
    # A JSON list: each record is reported at the line where it starts.
    records = [as_messages(EXAMPLES[3]), {"messages": [{"role": "bot", "content": "q"}]}]
    path = write(tmp_path / "list.json", records, as_list=True)
    found = load_file(path, tmp_path)
    start = path.read_text().splitlines().index("  {", 2) + 1  # (line 2 starts the first record)
    assert len(found) == 1 and found.problems[0].where == f"{path}:{start}" and start > 2
    # Problems name the field as the record has it: LLaVA's `value`, the_cauldron's texts[t].user/assistant.
    bad = [{"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "A"}]},
           {"images": [], "texts": [{"user": "Q", "assistant": "A"}, {"user": "Q2"}]},
           {"images": [], "texts": [{"user": "Q", "assistant": "A"}, {"user": "Q2", "assistant": " "}]}]
    found = [load_file(write(tmp_path / f"bad{i}.jsonl", [record]), tmp_path).problems[0].message
             for i, record in enumerate(bad)]
    assert found[0].startswith("conversations[0].value must be a string or a list of typed parts"), found[0]
    assert found[1] == "texts[1].assistant must be a string", found[1]
    assert found[2] == "texts[1].assistant (assistant) has an empty text", found[2]
    (tmp_path / "one.json").write_text(json.dumps(records[0], indent=1))
    with pytest.raises(DataError, match="one JSON object over several lines"):
        load_file(tmp_path / "one.json", tmp_path)


# -- bad records: one line, exit 2, before training --------------------------------------------------


GOOD = {"id": "good", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                          {"from": "gpt", "value": "A"}]}
BAD = [
    ("placeholders", {"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image> Q"},
                                                          {"from": "gpt", "value": "A"}]},
     "2 <image> placeholder(s) but 1 image(s)"),
    ("role", {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
     "unknown role 'bot'"),
    ("order", {"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"},
                                 {"from": "gpt", "value": "A"}]},
     "conversations[1] is a user message where the assistant's belongs"),
    ("no-answer", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                                     {"from": "human", "value": "Q2"}]},
     "the last user message (conversations[2]) has no assistant answer"),
    ("empty", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}]},
     "conversations[1] (assistant) has an empty text"),
    ("missing-image", {"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                              {"from": "gpt", "value": "A"}]},
     "nope.png does not exist"),
    ("unreadable-image", {"image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                   {"from": "gpt", "value": "A"}]}, "is unreadable"),
    ("escape", {"image": "sub/../../a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                              {"from": "gpt", "value": "A"}]},
     "image path 'sub/../../a.png' escapes the image directory"),
    ("absolute", {"image": "/etc/hosts", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                           {"from": "gpt", "value": "A"}]},
     "absolute image path '/etc/hosts' is not allowed"),
]


def common(tiny, out, *extra):
    return ["--model_name_or_path", str(tiny), "--output_dir", str(out), "--deepspeed", "none", "--num_crops", "1",
            "--max_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "1", "--eval_batch_size", "2",
            "--max_new_tokens", "4", "--no-tqdm", "--logging_steps", "1", "--save_strategy", "no",
            "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--warmup_steps", "0", *map(str, extra)]


def test_each_bad_record_exits_2_with_file_and_line(tiny_checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = write(data_dir / "good.jsonl", [GOOD])
    loaded = []
    import recipe.runner

    monkeypatch.setattr(recipe.runner.Runner, "setup_model", lambda *a, **k: loaded.append(1))  # must never be reached
    if True:
        for name, record, message in BAD + [("no-layout", None, "matches no layout; closest is llava")]:
            lines = [{"image": "a.png", "question": "Q"}] if record is None else [GOOD, record]
            path = write(data_dir / f"bad-{name}.jsonl", lines)
            argv = common(tiny_checkpoint, tmp_path / name, "--task_name", "shapes", "--train_file", path,
                          "--eval_file", good)
            assert cli(lambda: custom.TASK.run(argv)) == 2, name
            err = capsys.readouterr().err
            last = err.strip().splitlines()[-1]
            assert "Traceback" not in err and last.startswith("error: "), (name, err)
            assert f"{path}:{1 if record is None else 2}" in last and message in last, (name, last)
            if record is not None:
                assert "shapes training data" in last, last
    assert not loaded
    assert load_file(write(tmp_path / "abs.jsonl", [BAD[-1][1]]), data_dir, allow_absolute=True)[0].images == [
        Path("/etc/hosts")]


# -- the own-data script ------------------------------------------------------------------------------


def test_metric_flag(tmp_path, monkeypatch):
    from recipe.metrics import accuracy, anls, exact_match

    args = dict(train_file="t.jsonl", eval_file="e.jsonl")
    for name, function in (("exact_match", exact_match), ("accuracy", accuracy), ("anls", anls)):
        task = custom.named_task(custom.CustomArguments(metric=name, task_name="x", **args))
        assert (task.name, task.metric, task.score) == ("x", name, function)
    assert exact_match(["Red ", "red"], [["Red"], ["Red"]]) == 0.5 and accuracy(["red."], [["Red"]]) == 1.0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_scores.py").write_text("def length_match(p, r):\n    return sum(len(a) == len(b[0]) for a, b "
                                           "in zip(p, r)) / len(p)\n")
    task = custom.named_task(custom.CustomArguments(metric="my_scores:length_match", **args))
    assert task.metric == "length_match" and task.score(["ab"], [["cd"]]) == 1.0
    for bad, message in (("f1", "use one of exact_match"), ("nope_module:f", "cannot import module"),
                         ("my_scores:nothing", "has no function 'nothing'")):
        with pytest.raises(FlagError, match=message):
            custom.CustomArguments(metric=bad, **args).check()
    with pytest.raises(FlagError, match="--task_name"):
        custom.CustomArguments(task_name="my task", **args).check()
    with pytest.raises(FlagError, match="no data"):
        custom.CustomArguments().check()


def test_saved_dataset_trains_offline_and_the_task_is_named_everywhere(tiny_checkpoint, tmp_path, monkeypatch):
    """A save_to_disk dataset with PIL images (no hub), --metric module:function, tensorboard on:
    every output says "shapes" and the metric's name."""
    import recipe.plotting

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shape_scores.py").write_text("def shape_score(p, r):\n    return 0.25\n")
    rows = [as_messages(e, typed=True, image_value=pil) for e in EXAMPLES]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "validation": datasets.Dataset.from_list(rows[4:6])}).save_to_disk(str(tmp_path / "hf"))
    titles = []
    plot = recipe.plotting.plot_training_curves
    monkeypatch.setattr(recipe.plotting, "plot_training_curves",
                        lambda history, path, title: (titles.append(title), plot(history, path, title=title)))
    out = tmp_path / "out"
    results = custom.TASK.run(common(tiny_checkpoint, out, "--task_name", "shapes", "--dataset_name_or_path",
                                     tmp_path / "hf", "--eval_split", "validation",
                                     "--metric", "shape_scores:shape_score", "--report_to", "tensorboard",
                                     "--use_lora"))
    assert results["eval_after"] == 0.25
    after = json.loads((out / "eval_after.json").read_text())
    assert after["metric"] == "shape_score" and after["num_examples"] == 2
    card = (out / "README.md").read_text()
    assert "# shapes finetune of" in card and "- shapes" in card and "finetune_hf_trainer_custom.py" in card
    assert "ucf101" not in card and "shape_score after finetuning | 0.2500" in card
    summary = json.loads((out / "run_complete.json").read_text())
    assert summary["task"] == "shapes" and summary["training_args"]["metric_for_best_model"] == "shape_score"
    assert titles == ["shapes"]
    runs = [p.name for p in (out / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].startswith("shapes_")


def test_two_ranks_on_a_messages_file(tiny_checkpoint, data_dir, tmp_path):
    """torchrun, 2 CPU ranks (gloo, DDP): a messages jsonl file whose lines alternate image and
    text-only examples, so one rank has images and the other none in the same step."""
    image_examples = [e for e in EXAMPLES if images_of(e[2])][:2]
    text_examples = [("t1", "", [(["Say yes."], "yes")]), ("t2", "", [(["Say no, please, now."], "no")])]
    lines = [as_messages(e) for pair in zip(image_examples, text_examples) for e in pair]
    train = write(data_dir / "ranks-train.jsonl", lines)
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    args = common(tiny_checkpoint, out, "--task_name", "ranks", "--train_file", train, "--eval_file", train,
                  "--train_sampling_strategy", "sequential", "--eval_batch_size", "1", "--max_new_tokens", "2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(LAUNCHER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECIPE_TEST_BATCH_LOG": str(log),
           "RECIPE_TEST_SCRIPT": "finetune_hf_trainer_custom"}
    proc = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    after = json.loads((out / "eval_after.json").read_text())
    assert after["num_examples"] == 4 and (out / "model.safetensors").is_file()
    steps = [[line for line in (log / f"rank{r}.txt").read_text().splitlines() if line.startswith("train ")]
             for r in (0, 1)]
    assert {line.split()[2] for line in steps[0]} | {line.split()[2] for line in steps[1]} == {"images=0", "images=1"}
