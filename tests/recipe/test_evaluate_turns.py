"""--eval_turns: which assistant turns of a multi-turn example evaluation scores."""

import json

import pytest
import torch

from phi3v.image_processing_phi3v import Phi3VImageProcessor
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tiny_tokenizer import build_tokenizer
from recipe.records import Conversation, Turn
from recipe.evaluate import evaluate
from recipe.metrics import accuracy


class PromptEcho(torch.nn.Module):
    """Stands in for the model: answers "turn N", N = the number of <|assistant|> tags in its
    prompt, so each prediction shows which conversation prefix was its prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
        self.prompts = []

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()]
            self.prompts.append(self.tokenizer.decode(prompt))
            answer = self.tokenizer(f"turn {int((prompt == self.assistant).sum())}", add_special_tokens=False)
            rows.append(torch.cat([ids, torch.tensor(answer["input_ids"])]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=1), tokenizer=build_tokenizer())


def conversations():
    return [
        Conversation("chat", [Turn("first?", "turn 1"), Turn("second?", "wrong"), Turn("third?", "turn 3")],
                     references=["turn 3", "turn three"]),
        Conversation("single", [Turn("only?", "turn 1")]),
    ]


@pytest.mark.parametrize("which", ["last", "all"])
def test_eval_turns(processor, tmp_path, which):
    model = PromptEcho(processor.tokenizer)
    out = evaluate(model, processor, conversations(), accuracy, "accuracy", tmp_path / "eval.json",
                   eval_turns=which, batch_size=2, max_new_tokens=4)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == out
    got = [(p["id"], p.get("turn"), p["prediction"], p["references"]) for p in out["predictions"]]
    if which == "last":  # the last answer, with the earlier turns' reference answers as the prompt
        assert got == [("chat", None, "turn 3", ["turn 3", "turn three"]), ("single", None, "turn 1", ["turn 1"])]
        assert out["accuracy"] == 1.0
    else:  # every assistant turn, prompted with the conversation up to it
        assert got == [("chat", 0, "turn 1", ["turn 1"]), ("chat", 1, "turn 2", ["wrong"]),
                       ("chat", 2, "turn 3", ["turn 3", "turn three"]), ("single", 0, "turn 1", ["turn 1"])]
        assert out["accuracy"] == 0.75 and out["num_examples"] == 4
        second = next(p for p in model.prompts if "second?" in p and "third?" not in p)
        assert "turn 1" in second and "wrong" not in second  # earlier answers are context, not the scored one
