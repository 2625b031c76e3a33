"""Each task script end to end on the tiny model with a small local dataset in its source schema."""

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image, ImageDraw

import convert_ucf101
import finetune_hf_trainer_docvqa
import finetune_hf_trainer_hateful_memes
import finetune_hf_trainer_nlvr2
import finetune_hf_trainer_ucf101
from phi3v.configuration_phi3v import PHI3V_128K
from phi3v.tiny import save_tiny_checkpoint
from recipe.errors import DataError


def picture(i, size=(120, 90)):
    image = Image.new("RGB", size, ((50 * i) % 255, (90 * i) % 255, (130 * i) % 255))
    ImageDraw.Draw(image).text((5, 5), f"doc {i}", fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_crops=1)


def common(tiny, out):
    return ["--model_name_or_path", str(tiny), "--output_dir", str(out), "--deepspeed", "none",
            "--max_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "1", "--num_crops", "1",
            "--eval_batch_size", "2", "--max_new_tokens", "4", "--no-tqdm", "--logging_steps", "1",
            "--save_steps", "100", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
            "--warmup_steps", "0"]


def check_outputs(out: Path, metric: str, n_eval: int):
    for name in ("eval_before.json", "eval_after.json"):
        result = json.loads((out / name).read_text())
        assert result["metric"] == metric and 0.0 <= result[metric] <= 1.0
        assert result["num_examples"] == n_eval == len(result["predictions"])
        assert all({"id", "prediction", "references"} <= set(p) for p in result["predictions"])
    assert (out / "run_complete.json").exists()
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_docvqa(tiny, tmp_path):
    def rows(n, offset):
        return {"id": [f"q{offset + i}" for i in range(n)], "image": [picture(offset + i) for i in range(n)],
                "query": [{"en": f"What is written on document {offset + i}?"} for i in range(n)],
                "answers": [[f"doc {offset + i}", f"document {offset + i}"] for i in range(n)]}
    data = tmp_path / "docvqa"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(4, 0)),
                          "test": datasets.Dataset.from_dict(rows(3, 10))}).save_to_disk(data)
    out = tmp_path / "out"
    results = finetune_hf_trainer_docvqa.TASK.run(common(tiny, out) + ["--dataset_name_or_path", str(data)])
    check_outputs(out, "anls", 3)
    after = json.loads((out / "eval_after.json").read_text())
    assert after["predictions"][0]["references"] == ["doc 10", "document 10"]
    assert results["global_step"] == 2


def cauldron(n, images_per_row, question, answers):
    return datasets.Dataset.from_dict({
        "images": [[picture(i * images_per_row + k) for k in range(images_per_row)] for i in range(n)],
        "texts": [[{"user": question, "assistant": answers[i % len(answers)], "source": "test"}] for i in range(n)],
    })


def test_hateful_memes(tiny, tmp_path):
    data = tmp_path / "memes"
    datasets.DatasetDict({"train": cauldron(6, 1, "Is this meme hateful? Answer yes or no.", ["yes", "no"])}
                         ).save_to_disk(data)
    out = tmp_path / "out"
    finetune_hf_trainer_hateful_memes.TASK.run(common(tiny, out) + ["--dataset_name_or_path", str(data),
                                                                   "--eval_size", "2"])
    check_outputs(out, "accuracy", 2)


def test_nlvr2(tiny, tmp_path):
    data = tmp_path / "nlvr2"
    datasets.DatasetDict({"train": cauldron(5, 2, "The left image has more colour. True or false?",
                                            ["True", "False"])}).save_to_disk(data)
    out = tmp_path / "out"
    finetune_hf_trainer_nlvr2.TASK.run(common(tiny, out) + ["--dataset_name_or_path", str(data), "--eval_size", "2"])
    check_outputs(out, "accuracy", 2)
    before = json.loads((out / "eval_before.json").read_text())
    assert before["predictions"][0]["references"][0] in ("True", "False")


def synthetic_ucf101(data: Path) -> Path:
    """convert_ucf101.py output: 2 classes, 4 training and 2 test videos of 2 frames."""
    assert convert_ucf101.main(["--synthetic", "--out_dir", str(data), "--num_frames", "2", "--no-tqdm",
                                "--synthetic_classes", "2", "--synthetic_videos_per_class", "2",
                                "--synthetic_eval_videos_per_class", "1", "--synthetic_frames", "4"]) == 0
    return data


def test_ucf101(tiny, tmp_path):
    data = synthetic_ucf101(tmp_path / "ucf")
    out = tmp_path / "out"
    finetune_hf_trainer_ucf101.TASK.run(common(tiny, out) + ["--data_dir", str(data)])
    check_outputs(out, "accuracy", 2)


def test_eval_only_and_missing_data_message(tiny, tmp_path):
    with pytest.raises(DataError, match="convert_ucf101.py"):
        finetune_hf_trainer_ucf101.TASK.run(common(tiny, tmp_path / "o") + ["--data_dir", str(tmp_path / "nope")])
    with pytest.raises(DataError, match="--dataset_name_or_path DIR"):
        finetune_hf_trainer_nlvr2.TASK.run(common(tiny, tmp_path / "o2") + ["--dataset_name_or_path",
                                                                           "no-such-org/no-such-dataset"])


@pytest.fixture(scope="module")
def tiny_128k(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny128k"), family=PHI3V_128K)


@pytest.mark.parametrize("run_task", [
    test_docvqa, test_hateful_memes,
    pytest.param(test_nlvr2, marks=pytest.mark.slow), pytest.param(test_ucf101, marks=pytest.mark.slow),
], ids=["docvqa", "hateful_memes", "nlvr2", "ucf101"])
def test_every_task_script_on_a_phi3v_128k_checkpoint(run_task, tiny_128k, tmp_path):
    """The same runs and checks on a checkpoint laid out like Phi-3-vision-128k-instruct (no
    model_family key: detected); the output keeps its rules and its preprocessor layout.

    CI runs the two tasks whose published tables were measured on that model; what a task
    script adds (its data and scoring) is the same on both checkpoints, so the other two are
    in the slow set."""
    run_task(tiny_128k, tmp_path)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["model_family"] == PHI3V_128K
    auto_map = json.loads((out / "preprocessor_config.json").read_text())["auto_map"]
    # (the 128k release's module name, in its hub repository: the tiny source has no code files to copy)
    assert auto_map["AutoImageProcessor"] == "microsoft/Phi-3-vision-128k-instruct--image_processing_phi3_v.Phi3VImageProcessor"


def test_ucf101_with_own_file_names(tiny, tmp_path):
    data = synthetic_ucf101(tmp_path / "ucf")
    mine = tmp_path / "shapes"
    mine.mkdir()
    train_file, eval_file = mine / "my train set.jsonl", mine / "dev-2024.jsonl"
    (data / "ucf101_train.jsonl").rename(train_file)
    (data / "ucf101_test.jsonl").rename(eval_file)
    out = tmp_path / "out"
    finetune_hf_trainer_ucf101.TASK.run(common(tiny, out) + ["--train_file", str(train_file), "--eval_file",
                                                             str(eval_file), "--image_dir", str(data / "images")])
    check_outputs(out, "accuracy", 2)
    # Without --image_dir the images are looked up in images/ beside each file.
    (mine / "images").symlink_to(data / "images")
    args = finetune_hf_trainer_ucf101.Ucf101Arguments(train_file=str(train_file), eval_file=str(eval_file))
    args.check()
    train, eval_ = finetune_hf_trainer_ucf101.load_data(args, None)
    assert len(train) == 4 and len(eval_) == 2 and not train.problems
    assert all(str(path).startswith(str(mine / "images")) and path.is_file() for c in train for path in c.images)


@pytest.mark.parametrize("flags, message", [
    (["--train_file", "a.jsonl"], "--train_file needs --eval_file"),
    (["--eval_file", "b.jsonl"], "--eval_file needs --train_file to train"),
    (["--train_file", "a.jsonl", "--eval_file", "b.jsonl", "--data_dir", "d"], "exclusive"),
    (["--data_dir", "d", "--image_dir", "i"], "--image_dir goes with --train_file"),
])
def test_ucf101_file_flag_conflicts(tiny, tmp_path, flags, message):
    from recipe.errors import FlagError

    with pytest.raises(FlagError, match=message):
        finetune_hf_trainer_ucf101.TASK.run(common(tiny, tmp_path / "o") + flags)
