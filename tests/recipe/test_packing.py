"""--padding_free: packed rows give the unpacked step's loss, gradients and training trajectory.

The reference is the recipe's default layout, one example per micro-batch (each example alone:
its own positions, its own LongRoPE choice), gradients accumulated with the Trainer's
normalisation (summed loss / label count of the whole step).
"""

import math

import pytest
import torch

import finetune_hf_trainer_ucf101 as ucf
from phi3v.modeling_phi3v import packed_sequence_lengths
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tiny import build_tiny_model, tiny_config
from recipe.data import Collator, ConversationDataset
from recipe.errors import FlagError
from recipe.flag_checks import check_flags
from recipe.flag_parser import parse_args
from recipe.model import load_model
from recipe.packing import pack_examples, pack_rows
from recipe.tokenization import IGNORE_INDEX
from recipe.trainer import RecipeTrainer

PAD = 100
ROW = 700  # row limit of the model-level tests; also the tiny model's original context there


def test_rows_first_fit_in_order_and_overlong_alone():
    assert pack_rows([300, 100, 250, 50, 900, 150], 512) == [[0, 1, 3], [2, 5], [4]]
    assert pack_rows([512, 1, 513, 2], 512) == [[0], [1, 3], [2]]
    assert pack_rows([7], 512) == [[0]]


def test_pack_examples_layout():
    items = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([7, 5, 6])},
        {"input_ids": torch.tensor([1, 8]), "labels": torch.tensor([-100, 8])},
        {"input_ids": torch.tensor([1, 2, 3, 4, 5, 6]), "labels": torch.tensor([1, 2, 3, 4, 5, 6])},
    ]
    batch, ordered = pack_examples(items, PAD, 5)
    assert [item is items[i] for item, i in zip(ordered, [0, 1, 2])] == [True] * 3
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 8, PAD], [1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    # Each example's first label is never a target (it would be predicted across the boundary).
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 8, -100], [-100, 2, 3, 4, 5, 6]]
    assert "attention_mask" not in batch
    assert packed_sequence_lengths(batch["position_ids"]).tolist() == [[3, 3, 3, 2, 2, 1], [6] * 6]
    assert packed_sequence_lengths(torch.arange(6)[None]) is None


def image_item(generator, text_before: int, hd: tuple[int, int], slots: int, text_after: int, vocab: int) -> dict:
    """An example with one image of HD size `hd` in `slots` crop slots (padding crops all zero)."""
    rows, cols = hd[0] // 336, hd[1] // 336
    tokens = rows * 12 * (cols * 12 + 1) + 1 + 12 * 13
    pixels = torch.zeros(1, slots, 3, 336, 336)
    pixels[:, : 1 + rows * cols] = torch.randn(1, 1 + rows * cols, 3, 336, 336, generator=generator)
    ids = torch.cat([torch.randint(3, vocab - 64, (text_before,), generator=generator), torch.full((tokens,), -1),
                     torch.randint(3, vocab - 64, (text_after,), generator=generator)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-text_after + 2:] = ids[-text_after + 2:]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_sizes": torch.tensor([list(hd)])}


def text_item(generator, length: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab - 64, (length,), generator=generator)
    labels = ids.clone()
    labels[: length // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def label_count(batch) -> int:
    """What the Trainer divides the accumulated step's summed loss by (labels[..., 1:])."""
    return int(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum())


def step(model, batches, num_items):
    """Loss summed over micro-batches and gradients, as the Trainer's accumulation computes them."""
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_step_equals_unpacked(attention):
    # original context = the row limit: the over-long example uses LongRoPE's long factors alone, and
    # must keep them while the other rows, padded to its length, keep the short ones.
    config = tiny_config(vocab_size=256, pad_token_id=PAD, original_max_position_embeddings=ROW)
    config._attn_implementation = attention
    model = build_tiny_model(config, seed=0).train()
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    items = [
        text_item(g, 20, vocab),
        image_item(g, 5, (336, 336), 3, 12, vocab),  # 313 image tokens, 1 padding crop slot
        text_item(g, 15, vocab),
        image_item(g, 4, (336, 672), 3, 10, vocab),  # 457 image tokens: does not fit row 0 any more
        text_item(g, ROW + 90, vocab),  # over the row limit: a row of its own
        image_item(g, 3, (336, 336), 2, 8, vocab),  # fits row 0: its image comes before item 3's
    ]
    assert pack_rows([len(item["input_ids"]) for item in items], ROW) == [[0, 1, 2, 5], [3], [4]]
    packed = Collator(pad_token_id=PAD, max_tokens_per_row=ROW)(items)
    assert packed["image_sizes"].tolist() == [[336, 336], [336, 336], [336, 672]]
    assert packed["pixel_values"].shape[:2] == (3, 3)
    assert packed_sequence_lengths(packed["position_ids"]).max() == ROW + 90
    unpacked = [Collator(pad_token_id=PAD)([item]) for item in items]
    num_items = sum(label_count(b) for b in unpacked)
    assert label_count(packed) == num_items

    loss_ref, grads_ref = step(model, unpacked, num_items)
    loss, grads = step(model, [packed], num_items)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert any("img_processor" in n for n in grads) and any("layers.1." in n for n in grads)
    # Relative to each tensor's largest gradient, or to the largest of all for gradients that are
    # zero in exact arithmetic (CLIP's key biases: softmax ignores them) and only rounding noise.
    largest = max(g.abs().max() for g in grads_ref.values())
    for name in grads:
        scale = torch.maximum(grads_ref[name].abs().max(), largest * 1e-3)
        assert (grads[name] - grads_ref[name]).abs().max() / scale < 1e-4, name


def test_packing_keeps_attention_within_examples():
    """Changing one example changes no other example's logits (the mask is block-diagonal)."""
    config = tiny_config(vocab_size=256, pad_token_id=PAD)
    model = build_tiny_model(config, seed=0)
    g = torch.Generator().manual_seed(1)
    items = [text_item(g, 30, 256), text_item(g, 25, 256), text_item(g, 10, 256)]
    batch = Collator(pad_token_id=PAD, max_tokens_per_row=ROW)(items)
    changed = dict(items[0], input_ids=items[0]["input_ids"].flip(0))
    other = Collator(pad_token_id=PAD, max_tokens_per_row=ROW)([changed, *items[1:]])
    with torch.no_grad():
        a, b = model(**batch).logits, model(**other).logits
    assert not torch.allclose(a[0, :30], b[0, :30])
    torch.testing.assert_close(a[0, 30:], b[0, 30:])


VARLEN_CALLS = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's varlen contract on CPU: the rows flattened into one sequence, causal
    attention within each [cu_seq_lens_q[i], cu_seq_lens_q[i + 1]) and nowhere else."""
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and torch.equal(cu, kwargs["cu_seq_lens_k"]) and isinstance(longest, int)
    batch, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * length, heads, dim).transpose(0, 1) for x in (query, key, value))
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scaling)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ], dim=1)
    assert max(b - a for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())) == longest
    VARLEN_CALLS.append(cu.tolist())
    return out.transpose(0, 1).reshape(batch, length, heads, dim), None


def test_flash_path_gets_varlen_boundaries_across_rows():
    """With a flash backend the model hands transformers' varlen boundaries (from position_ids,
    over the flattened rows) to the attention function; checked with a CPU stand-in for
    flash_attn_varlen_func registered under a flash name."""
    from transformers import AttentionInterface

    AttentionInterface.register("flash_varlen_cpu_test", varlen_attention)
    config = tiny_config(vocab_size=256, pad_token_id=PAD)
    model = build_tiny_model(config, seed=0)
    g = torch.Generator().manual_seed(2)
    items = [text_item(g, 30, 256), text_item(g, 25, 256), text_item(g, 40, 256), text_item(g, 12, 256)]
    batch = Collator(pad_token_id=PAD, max_tokens_per_row=60)(items)
    assert batch["input_ids"].shape == (2, 55)  # [30 + 25], [40 + 12 + 3 padding]
    with torch.no_grad():
        reference = model(**batch).logits  # SDPA, block-diagonal mask
        model.config._attn_implementation = "flash_varlen_cpu_test"
        model.config.vision_config._attn_implementation = "sdpa"
        flash = model(**batch).logits
    torch.testing.assert_close(flash, reference, rtol=1e-5, atol=1e-5)
    # One call per decoder layer; row 1's padding (3 tokens) is a segment of its own.
    assert VARLEN_CALLS == [[0, 30, 55, 95, 107, 110]] * config.num_hidden_layers


def packed_trainer(tiny, data, out, *extra) -> RecipeTrainer:
    argv = ["--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--num_crops", "1",
            "--no-tqdm", "--deepspeed", "none", "--batch_size", "4", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--max_steps", "2", "--save_strategy", "no",
            "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0", "--logging_steps", "1",
            *extra]
    model_args, data_args, training_args = parse_args(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
    check_flags(model_args, data_args, training_args)
    processor = Phi3VProcessor.from_pretrained(tiny, num_crops=1)
    train, _ = ucf.load_data(data_args, model_args)
    row_limit = data_args.max_tokens_per_row if data_args.padding_free else None
    return RecipeTrainer(
        model=load_model(model_args, training_args),
        args=training_args,
        train_dataset=ConversationDataset(train, processor),
        data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id, max_tokens_per_row=row_limit),
        processing_class=processor,
        model_args=model_args,
    )


def test_packed_training_ends_with_unpacked_weights(tiny_checkpoint, ucf101_data, tmp_path):
    """2 optimizer steps of 4 examples: one per micro-batch (accumulated 4x), packed 2 x 2 (rows of
    two examples, accumulated 2x) and packed 4 x 1 (two rows) end with the same weights."""
    runs = {
        "unpacked": ("--batch_size_per_gpu", "1"),
        "packed 2x2": ("--batch_size_per_gpu", "2", "--padding_free"),
        "packed 4x1": ("--batch_size_per_gpu", "4", "--padding_free", "--max_tokens_per_row", "1500"),
    }
    weights, curves, start = {}, {}, None
    for name, extra in runs.items():
        trainer = packed_trainer(tiny_checkpoint, ucf101_data, tmp_path / name.replace(" ", "_"), *extra)
        start = start or {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if name != "unpacked":
            batch = next(iter(trainer.get_train_dataloader()))
            assert "attention_mask" not in batch and batch["position_ids"].shape[0] == (2 if "4x1" in name else 1)
        trainer.train()
        weights[name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        curves[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    reference = weights.pop("unpacked")
    assert all(not torch.equal(reference[k], start[k]) for k in reference if k.endswith("qkv_proj.weight"))
    for name, packed in weights.items():
        assert curves[name] == pytest.approx(curves["unpacked"], rel=1e-4), name
        for key in reference:
            torch.testing.assert_close(packed[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_row_limit_above_original_context_is_refused(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--deepspeed", "none", "--padding_free", "--max_tokens_per_row", "4097"]
    with pytest.raises(FlagError, match="max_tokens_per_row 4097 is outside 1..4096"):
        parse_args(argv=argv)  # (the checks run while parsing, before anything loads)


def test_run_trains_padding_free(tiny_checkpoint, ucf101_data, tmp_path, monkeypatch):
    """`--padding_free` reaches the training collator of `recipe.runner.run`, and the run completes."""
    import recipe.supervised
    import recipe.task

    batches = []

    class Recording(Collator):
        def __call__(self, items):
            batch = super().__call__(items)
            if self.padding_side == "right":
                batches.append(batch)
            return batch

    monkeypatch.setattr(recipe.supervised, "Collator", Recording)
    results = recipe.task.run(ucf.TASK, [
        "--model_name_or_path", str(tiny_checkpoint), "--data_dir", str(ucf101_data), "--output_dir",
        str(tmp_path / "out"), "--num_crops", "1", "--no-tqdm", "--deepspeed", "none", "--padding_free",
        "--max_tokens_per_row", "1500", "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "1",
        "--save_strategy", "no", "--skip_eval_before", "--max_eval_samples", "1", "--max_new_tokens", "2",
        "--dataloader_num_workers", "0",
    ])
    assert results["global_step"] == 1 and math.isfinite(results["train_loss"])
    assert batches and all("position_ids" in b and "attention_mask" not in b for b in batches)
    assert batches[0]["input_ids"].shape[0] == 2  # 4 examples of ~700 tokens: two rows of two
    # the run's throughput counts the packed rows' real tokens (no attention_mask to sum) and images
    speed, rows = results["throughput"], batches[0]["input_ids"]
    pad = Phi3VProcessor.from_pretrained(tiny_checkpoint).tokenizer.pad_token_id
    assert 0 < speed["real_tokens"] == int((rows != pad).sum()) < rows.numel()
    assert speed["images"] == len(batches[0]["image_sizes"])
