"""Preference tuning (DPO), an objective of the shared runner (recipe.objective, recipe.runner).

A task script names it as its Task's objective (`objective="preference"`); the runner keeps
everything else (flags, modes, checkpoints, saving, merging, the report). What `Preference`
supplies:

- data: pairs read by the task (recipe.pair_layouts), validated with `validate_pairs`;
- trainer: `PreferenceTrainer`, a RecipeTrainer whose loss is DPO (recipe.dpo) on the log-probs of
  the shared-prefix pair forward (recipe.pairs.pair_log_probs), and which logs TRL's metrics;
- reference model (`Reference`): LoRA/QLoRA: the same model with its adapters disabled (peft's
  `disable_adapter`, no second copy); continuing an SFT adapter (`--adapter`): that adapter loaded
  a second time, frozen, on the same base (PEFT adapter "reference", switched to for the reference
  pass); full and frozen-vision finetuning: a frozen copy (under
  ZeRO-3 sharded like the policy, through `deepspeed.initialize` as TRL prepares its reference);
  `--precompute_ref_log_probs`: one pass before the first step, stored in the output directory
  (ref_log_probs_train.pt) and reused on resume, no reference in memory during training. Where the
  vision side is frozen (it carries no adapter and is not trained) the reference takes the
  policy's image features instead of encoding the images again;
- evaluation (`PairEvaluator`): on held-out pairs, the metrics TRL logs (rewards/accuracies,
  rewards/margins, rewards/chosen, rewards/rejected, logps/chosen, logps/rejected) in
  eval_before.json / eval_after.json and through the Trainer's loggers (tensorboard). The
  reference log-probs of the held-out pairs are computed once, before the first step (the model is
  still the reference then; the evaluation before training takes them as its own), and stored
  (ref_log_probs_eval.pt) for resumed runs. `--eval_only`
  measures against the run's starting point: `--ref_model PATH`, or for a LoRA output its base
  (adapters disabled); eval_after.json names it ("reference").
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from phi3v.jsonfile import write_json_atomic
from phi3v.modeling_phi3v import Phi3VModel

from .dpo import METRIC_NAMES, DPOLoss
from .errors import DataError
from .evaluate import autocast_dtype, evaluate, generation_kwargs, to_device
from .metrics import score_function
from .model import REFERENCE_ADAPTER, load_model
from .objective import Objective
from .pairs import PairCollator, PairDataset, pair_log_probs
from .report import Throughput
from .trainer import RecipeTrainer
from .validation import validate_pairs

__all__ = ["Preference", "PreferenceTrainer", "PairEvaluator", "Reference", "dataset_log_probs"]

logger = logging.getLogger("recipe")

REF_TRAIN_FILE = "ref_log_probs_train.pt"
REF_EVAL_FILE = "ref_log_probs_eval.pt"


# -- data ------------------------------------------------------------------------------------


class IndexedPairDataset(PairDataset):
    """PairDataset whose items carry their index (precomputed reference log-probs are looked up
    by it)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "index": index}


@dataclass
class IndexedPairCollator(PairCollator):
    def __call__(self, items):
        batch = super().__call__(items)
        batch["pair_index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


def _collator(processor, model) -> IndexedPairCollator:
    config = model.config
    switch = getattr(config, "original_max_position_embeddings", None) or 4096
    return IndexedPairCollator(pad_token_id=processor.tokenizer.pad_token_id, original_max_position_embeddings=switch)


# -- log-probs over a whole dataset ------------------------------------------------------------


@dataclass
class LogProbs:
    """Per pair, in dataset order: summed answer log-probs and answer token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def save(self, path: Path, ids: Sequence[str]) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"ids": list(ids), **{k: getattr(self, k) for k in ("chosen", "rejected", "chosen_tokens",
                                                                         "rejected_tokens")}}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, ids: Sequence[str]) -> LogProbs:
        stored = torch.load(path, weights_only=True)
        if stored["ids"] != list(ids):
            raise DataError(f"{path} holds the reference log-probs of other pairs than this run's; the data or "
                            "--max_train_samples/--seed changed since the run started: resume with the same data, "
                            "or start over in a new --output_dir", everywhere=True)
        return cls(stored["chosen"], stored["rejected"], stored["chosen_tokens"], stored["rejected_tokens"])


def _lockstep(model, on: bool) -> None:
    """Under ZeRO-3, forwards without autograd must agree across ranks on running the image side
    (see Phi3VModel._dummy_image_needed)."""
    for module in model.modules():
        if isinstance(module, Phi3VModel):
            module.vision_lockstep = on


def dataset_log_probs(model, dataset: PairDataset, collator, batch_size: int, device, autocast_dtype=None,
                      desc: str = "log-probs", progress: bool = False, loader_kwargs: dict | None = None) -> LogProbs:
    """The model's log-probs of every pair (no autograd), each rank its share in length order, the
    same number of forwards on every rank (ZeRO-3 runs them in lockstep); every rank gets all.

    The batches are built by a DataLoader with `loader_kwargs` (`_loader_kwargs`: the run's
    --dataloader_num_workers), so image preprocessing (~60 ms an image at 16 crops) overlaps the
    forwards instead of idling the GPU; the batches and their order are the same with any number
    of workers."""
    from tqdm.auto import tqdm

    state = PartialState()
    mine = sorted(range(state.process_index, len(dataset), state.num_processes), key=lambda i: dataset.lengths[i])
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    n_batches = max(gather_object([len(batches)]))
    # (a rank out of pairs runs forwards of pair 0, unrecorded, to keep in step)
    plan = batches + [[0]] * (n_batches - len(batches))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=collator, **(loader_kwargs or {}))
    zero3 = is_deepspeed_zero3_enabled()
    was_training = model.training
    model.eval()
    if zero3:
        _lockstep(model, True)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                if autocast_dtype is not None else nullcontext())
    local: dict[int, tuple[float, float, int, int]] = {}
    bar = tqdm(total=n_batches, desc=desc, disable=not (progress and state.is_main_process))
    with torch.no_grad(), autocast:
        for b, batch in enumerate(loader):
            indices = plan[b]
            batch = {k: v.to(device, non_blocking=loader.pin_memory) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            out = pair_log_probs(model, batch)
            if b < len(batches):
                for j, i in enumerate(indices):
                    local[i] = (out.chosen_logps[j].item(), out.rejected_logps[j].item(),
                                int(out.chosen_tokens[j]), int(out.rejected_tokens[j]))
            bar.update(1)
    bar.close()
    if zero3:
        _lockstep(model, False)
    if was_training:
        model.train()
    for part in gather_object([local]):
        local.update(part)
    columns = list(zip(*(local[i] for i in range(len(dataset))))) or [(), (), (), ()]
    return LogProbs(torch.tensor(columns[0], dtype=torch.float32), torch.tensor(columns[1], dtype=torch.float32),
                    torch.tensor(columns[2], dtype=torch.long), torch.tensor(columns[3], dtype=torch.long))


def _loader_kwargs(training_args, device) -> dict:
    """`dataset_log_probs`' DataLoader settings, the Trainer's for its own loaders: workers,
    prefetching and timeout, pinned memory (on a GPU only: on a CPU it only warns)."""
    workers = training_args.dataloader_num_workers
    kwargs = dict(num_workers=workers,
                  pin_memory=training_args.dataloader_pin_memory and torch.device(device).type == "cuda")
    if workers > 0:
        kwargs.update(prefetch_factor=training_args.dataloader_prefetch_factor,
                      timeout=training_args.dataloader_timeout or 0)
    return kwargs


# -- reference -------------------------------------------------------------------------------


class Reference:
    """The reference model's log-probs of a training batch, in the mode the flags ask for."""

    def __init__(self, model_args, data_args, training_args):
        self.model_args, self.training_args = model_args, training_args
        self.precompute = data_args.precompute_ref_log_probs
        self.batch_size = data_args.eval_batch_size
        self.mode = ("precomputed" if self.precompute else
                     "adapter" if getattr(data_args, "adapter", None) and model_args.use_lora else
                     "adapters" if model_args.use_lora else "copy")
        # A frozen vision side is the same in policy and reference: its features are reused. (Not
        # under ZeRO-3: there a rank that reuses features would skip the vision all-gathers that
        # an image-less rank's dummy crop joins.)
        self.reuse_features = model_args.freeze_vision_model and not is_deepspeed_zero3_enabled()
        self.copy: torch.nn.Module | None = None
        self.table: LogProbs | None = None

    def describe(self) -> str:
        return {"precomputed": f"log-probs precomputed before training ({REF_TRAIN_FILE})",
                "adapters": "the model with its adapters disabled",
                "adapter": f"the base with the starting adapter, frozen (PEFT adapter {REFERENCE_ADAPTER!r})",
                "copy": "a frozen copy of the starting model"}[self.mode] + (
            "; the policy's image features reused" if self.reuse_features and self.mode != "precomputed" else "")

    def prepare(self, trainer, model, train_dataset, collator, resumed: bool) -> None:
        """Before the first step: the precomputed table, or the frozen copy."""
        output_dir = Path(trainer.args.output_dir)
        if self.mode == "precomputed":
            path = output_dir / REF_TRAIN_FILE
            ids = [pair.id for pair in train_dataset.pairs]
            if resumed and path.exists():  # (not a fresh start's: see PairEvaluator.prepare_reference)
                self.table = LogProbs.load(path, ids)
                logger.info("reference log-probs of the training pairs: %s", path)
                return
            if resumed:
                raise DataError(f"resuming with --precompute_ref_log_probs needs {path}, written when the run "
                                "started; it is gone: start over in a new --output_dir", everywhere=True)
            self.table = dataset_log_probs(model, train_dataset, collator, self.batch_size,
                                           trainer.args.device, autocast_dtype(trainer.args),
                                           desc="reference log-probs", progress=not trainer.args.disable_tqdm,
                                           loader_kwargs=_loader_kwargs(trainer.args, trainer.args.device))
            if trainer.is_world_process_zero():
                self.table.save(path, ids)
            logger.info("reference log-probs of %d training pairs precomputed into %s", len(ids), path)
        elif self.mode == "copy" and self.copy is None:
            self.copy = self._load_copy(trainer)

    def _load_copy(self, trainer) -> torch.nn.Module:
        """The starting model again, frozen. Under ZeRO-3 it is built inside zero.Init (the
        Trainer's DeepSpeed config is active) and wrapped by DeepSpeed without optimizer, sharded
        like the policy; otherwise it lives on the device in the training's compute dtype."""
        args = self.training_args
        reference = load_model(self.model_args, args)
        reference.requires_grad_(False)
        reference.eval()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
            for key in ("optimizer", "scheduler"):
                config.pop(key, None)
            engine, *_ = deepspeed.initialize(model=reference, config=config)
            engine.eval()
            reference = engine.module
            _lockstep(reference, True)
        else:
            dtype = autocast_dtype(args) or torch.float32
            reference.to(device=args.device, dtype=dtype)
        return reference

    def log_probs(self, trainer, model, inputs, policy) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "precomputed":
            index = inputs["pair_index"].cpu()
            device = policy.chosen_logps.device
            return self.table.chosen[index].to(device), self.table.rejected[index].to(device)
        features = policy.image_features.detach() if self.reuse_features and policy.image_features is not None else None
        with torch.no_grad():
            if self.mode in ("adapters", "adapter"):
                unwrapped = trainer.accelerator.unwrap_model(model)
                zero3 = is_deepspeed_zero3_enabled()
                if zero3:
                    _lockstep(unwrapped, True)
                try:
                    with (unwrapped.disable_adapter() if self.mode == "adapters"
                          else active_adapter(unwrapped, REFERENCE_ADAPTER)):
                        out = pair_log_probs(unwrapped, inputs, image_features=features)
                finally:
                    if zero3:
                        _lockstep(unwrapped, False)
            else:
                out = pair_log_probs(self.copy, inputs, image_features=features)
        return out.chosen_logps, out.rejected_logps


@contextmanager
def active_adapter(model, name: str):
    """`model` (a PeftModel) runs adapter `name` inside; every parameter keeps its requires_grad
    (PEFT's set_adapter would make the adapter it activates trainable)."""
    before = model.active_adapter
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(before)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)


# -- trainer ---------------------------------------------------------------------------------


class PairThroughput(Throughput):
    """Throughput counting pairs, and each pair's images and tokens once (the collator's
    `num_images` / `num_tokens`: the prompt once, both answers); crops and the FLOP counts are
    those of the rows the model ran."""

    def __init__(self, pad_token_id):
        super().__init__(pad_token_id)
        self.pairs = 0
        self._pair_images = self._pair_tokens = 0  # tensor sums, read once at the end (no sync per step)

    def count(self, inputs: dict) -> None:
        self.pairs += len(inputs["chosen_rows"])
        self._pair_images = self._pair_images + inputs["num_images"]
        self._pair_tokens = self._pair_tokens + inputs["num_tokens"]
        super().count({key: inputs.get(key) for key in ("input_ids", "position_ids", "image_sizes")})

    def counts(self) -> dict:
        return {**super().counts(), "images": int(self._pair_images), "real_tokens": int(self._pair_tokens)}

    def summary(self, runtime, device, model=None, *args, **kwargs) -> dict:
        out = super().summary(runtime, device, model, *args, **kwargs)
        pairs = sum(gather_object([self.pairs]))
        runtime = runtime or float("nan")
        out.update(pairs=pairs, pairs_per_s=pairs / runtime, pairs_per_s_per_device=pairs / runtime / out["world_size"])
        return out

    @staticmethod
    def describe(summary: dict) -> str:
        return f"{summary['pairs_per_s']:.2f} pairs/s, " + Throughput.describe(summary)


class PreferenceTrainer(RecipeTrainer):
    """RecipeTrainer with the DPO loss on the shared-prefix pair forward; logs TRL's metrics."""

    def __init__(self, *args, dpo_loss: DPOLoss, reference: Reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo_loss, self.reference = dpo_loss, reference
        # The loss is a mean over the micro-batch's pairs: the Trainer averages it over accumulation.
        self.model_accepts_loss_kwargs = False
        self.throughput = PairThroughput(self.data_collator.pad_token_id)
        self._metric_sums: dict[str, torch.Tensor] = defaultdict(lambda: 0)
        self._metric_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.throughput.count(inputs)
        policy = pair_log_probs(model, inputs)
        ref_chosen, ref_rejected = self.reference.log_probs(self, model, inputs, policy)
        loss, metrics = self.dpo_loss(policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected,
                                      policy.chosen_tokens, policy.rejected_tokens, chosen_nll=policy.chosen_nll)
        if model.training:
            for name, values in metrics.items():  # summed as tensors: no device sync per step
                self._metric_sums[name] = self._metric_sums[name] + values.float().mean()
            self._metric_count += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each DPO metric since the last log (over the micro-batches of every rank)."""
        if "loss" in logs and self._metric_count:
            names = sorted(self._metric_sums)
            sums = torch.stack([torch.as_tensor(self._metric_sums[n], dtype=torch.float32, device=self.args.device)
                                for n in names] + [torch.tensor(float(self._metric_count), device=self.args.device)])
            sums = self.accelerator.reduce(sums, reduction="sum")
            for name, value in zip(names, sums[:-1].tolist()):
                logs[name] = value / sums[-1].item()
            self._metric_sums.clear()
            self._metric_count = 0
        super().log(logs, start_time)


# -- evaluation ------------------------------------------------------------------------------


class PairEvaluator:
    """TRL's DPO metrics on the held-out pairs, for any model and moment of the run (the
    interface of recipe.supervised.TaskEvaluator): each call writes `<name>.json` (the metrics and the
    per-pair log-probs and rewards), logs one line and, given a trainer, logs `eval_<metric>`
    for each metric through it (tensorboard, the training curves). It returns the task's metric
    (one of `metrics(data_args)`: Preference.check refuses any other)."""

    @staticmethod
    def metrics(data_args) -> tuple[str, ...]:
        """The metrics it computes: TRL's, and the generation metric of --metric if given."""
        generation = getattr(data_args, "metric", None)
        return METRIC_NAMES + ((generation.partition(":")[2] or generation,) if generation else ())

    @property
    def metric(self) -> str:
        return self.task.metric

    def __init__(self, task, processor, pairs, model_args, data_args, training_args):
        self.task, self.processor, self.pairs = task, processor, list(pairs)
        self.dataset = IndexedPairDataset(self.pairs, processor)
        self.output_dir = Path(training_args.output_dir)
        self.batch_size = data_args.eval_batch_size
        self.device = training_args.device
        self.autocast_dtype = autocast_dtype(training_args)
        self.progress = not training_args.disable_tqdm
        self.dpo_loss = DPOLoss.from_flags(data_args)
        self.reference: LogProbs | None = None
        self.seconds = 0.0
        # --eval_only: the reference is not the model before training but the run's starting point.
        self.eval_only, self.ref_model = data_args.eval_only, getattr(data_args, "ref_model", None)
        self.model_args, self.training_args = model_args, training_args
        self.reference_name: str | None = None
        # A fresh run's starting model and its log-probs (the reference): the evaluation before the
        # first step measures that very model, and takes them instead of a second pass.
        self._start: tuple[Any, LogProbs] | None = None
        # --metric: the generation metric, the chosen answer as the reference (as TaskEvaluator, unsaved).
        self.generation_metric = getattr(data_args, "metric", None)
        if self.generation_metric:
            self.score = score_function(self.generation_metric)
            self.generation_metric = self.generation_metric.partition(":")[2] or self.generation_metric
            self.generation_kwargs = generation_kwargs(data_args, training_args)

    def _log_probs(self, model, desc: str) -> LogProbs:
        to_device(model, self.device)
        return dataset_log_probs(model, self.dataset, _collator(self.processor, model), self.batch_size, self.device,
                                 self.autocast_dtype, desc=desc, progress=self.progress,
                                 loader_kwargs=_loader_kwargs(self.training_args, self.device))

    def prepare_reference(self, model, resumed: bool) -> None:
        """The held-out pairs' reference log-probs: computed from `model` while it is still the
        reference (before the first step), or read back when resuming."""
        start = time.perf_counter()
        path = self.output_dir / REF_EVAL_FILE
        ids = [pair.id for pair in self.pairs]
        # Only a resumed run reads it back: a file left by an earlier start that never reached a
        # checkpoint may come from another model (same pairs, other --model_name_or_path/--adapter).
        if resumed and path.exists():
            self.reference = LogProbs.load(path, ids)
        elif resumed:
            raise DataError(f"resuming needs {path}, written when the run started; it is gone: start over in a "
                            "new --output_dir", everywhere=True)
        else:
            self.reference = self._log_probs(model, "reference log-probs (evaluation)")
            self._start = (model, self.reference)
            if PartialState().is_main_process:
                self.reference.save(path, ids)
        self.seconds += time.perf_counter() - start

    def prepare_eval_only_reference(self, model) -> None:
        """--eval_only: the reference log-probs from --ref_model, or from `model` (a LoRA output:
        base + adapter) with its adapters disabled, i.e. the base the adapter was trained on."""
        start = time.perf_counter()
        if self.ref_model:
            # (a LoRA output as --ref_model loads as base + adapter through transformers' PEFT integration)
            reference = load_model(replace(self.model_args, model_name_or_path=self.ref_model, use_lora=False),
                                   self.training_args).eval()
            reference.requires_grad_(False)
            dtype = autocast_dtype(self.training_args)
            if dtype is not None and not is_deepspeed_zero3_enabled() and not getattr(reference, "is_loaded_in_4bit",
                                                                                       False):
                # Forwards only: the compute dtype, as training's frozen copy (Reference._load_copy), not
                # the fp32 weights load_model gives a model the optimiser would step.
                reference.to(dtype=dtype)
            self.reference = self._log_probs(reference, "reference log-probs (--ref_model)")
            self.reference_name = self.ref_model
            del reference
            gc.collect()
        else:
            if hasattr(model, "disable_adapter"):  # a PeftModel
                with model.disable_adapter():
                    self.reference = self._log_probs(model, "reference log-probs (adapters disabled)")
            else:  # transformers' PEFT integration (a LoRA output loaded by from_pretrained)
                model.disable_adapters()
                try:
                    self.reference = self._log_probs(model, "reference log-probs (adapters disabled)")
                finally:
                    model.enable_adapters()
            self.reference_name = "the base model (adapters disabled)"
        logger.info("--eval_only: rewards against %s", self.reference_name)
        self.seconds += time.perf_counter() - start

    def _generate(self, model) -> dict:
        """--metric on answers generated to the pairs' prompts (recipe.evaluate; nothing written)."""
        return evaluate(model, self.processor, [pair.conversation for pair in self.pairs], self.score,
                        self.generation_metric, None, device=self.device, synced_gpus=is_deepspeed_zero3_enabled(),
                        **self.generation_kwargs)

    def _starting_log_probs(self, model, trainer) -> LogProbs | None:
        """The reference's log-probs when `model` is provably the one they came from: the first
        evaluation after a fresh start's prepare_reference, of the same model, before any step
        (the evaluation before training; policy and reference are one model then, whatever the
        reference mode). Any later evaluation computes its own."""
        start, self._start = self._start, None
        if start is None or start[0] is not model or trainer is None or trainer.state.global_step != 0:
            return None
        return start[1]

    def __call__(self, model, name: str, trainer=None) -> float:
        if self.reference is None and self.eval_only:
            self.prepare_eval_only_reference(model)
        if self.reference is None:
            raise RuntimeError("PairEvaluator.prepare_reference must run before the first evaluation")
        start = time.perf_counter()
        policy = self._starting_log_probs(model, trainer) or self._log_probs(model, name)
        ref = self.reference
        loss, per_pair = self.dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected,
                                       policy.chosen_tokens, policy.rejected_tokens,
                                       # (RPO's NLL per chosen token over all pairs, as in training)
                                       chosen_nll=-policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1))
        metrics = {k: float(per_pair[k].mean()) for k in METRIC_NAMES}
        generated = self._generate(model) if self.generation_metric else {}
        if generated:
            metrics[self.generation_metric] = generated[self.generation_metric]
        out = {"metric": self.metric, **metrics, "loss": float(loss), "num_examples": len(self.pairs),
               **({"reference": self.reference_name} if self.reference_name else {}),
               "pairs": [{"id": pair.id, "logps/chosen": float(policy.chosen[i]),
                          "logps/rejected": float(policy.rejected[i]),
                          "rewards/margins": float(per_pair["rewards/margins"][i])}
                         for i, pair in enumerate(self.pairs)],
               **({"predictions": generated["predictions"]} if generated else {})}
        if PartialState().is_main_process:
            write_json_atomic(self.output_dir / f"{name}.json", out)
        self.seconds += time.perf_counter() - start
        logger.info("%s on %d pairs: rewards/accuracies %.4f, rewards/margins %.4f%s", name, len(self.pairs),
                    metrics["rewards/accuracies"], metrics["rewards/margins"],
                    f", {self.generation_metric} {metrics[self.generation_metric]:.4f}" if generated else "")
        if trainer is not None:
            trainer.log({f"eval_{k}": v for k, v in metrics.items()})
        return metrics[self.metric]


# -- the objective ---------------------------------------------------------------------------


class _ReferenceAtTrainBegin(TrainerCallback):
    """Before the first step, while the model is the reference: the held-out pairs' reference
    log-probs, the precomputed training ones (--precompute_ref_log_probs), the frozen copy. From
    here because under ZeRO-3 only the DeepSpeed engine (created by now) runs partitioned weights."""

    def __init__(self, runner):
        self.runner = runner

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.runner.trainer
        resumed = bool(args.resume_from_checkpoint)
        trainer.task_eval.prepare_reference(model, resumed)
        trainer.reference.prepare(trainer, model, trainer.train_dataset, trainer.data_collator, resumed)
        logger.info("reference: %s", trainer.reference.describe())


class Preference(Objective):
    """Pairs in, DPO on the shared-prefix pair forward as the loss (PreferenceTrainer), TRL's
    reward metrics on held-out pairs (PairEvaluator)."""

    name = "preference"
    data_noun = unit = "pairs"
    trainer_class = PreferenceTrainer

    def check(self, task, data_args) -> None:
        if task.metric not in PairEvaluator.metrics(data_args):
            raise ValueError(f"task {task.name!r}: metric {task.metric!r} is not one the preference objective "
                             f"computes ({', '.join(PairEvaluator.metrics(data_args))})")

    def validate(self, runner, records, cache_dir=None, **kwargs):
        # (no validation cache for pairs: recipe.validation_cache keys single conversations)
        return validate_pairs(records, **kwargs)

    def load_kwargs(self, runner) -> dict:
        """With --adapter: that adapter to train and (unless the reference log-probs are
        precomputed) its frozen twin, the reference."""
        model_args, data_args = runner.model_args, runner.data_args
        if not data_args.adapter:
            return {}
        base = json.loads((Path(data_args.adapter) / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
        if base and base != model_args.model_name_or_path:
            logger.warning("--adapter %s was trained on %s; applying it to --model_name_or_path %s", data_args.adapter,
                           base, model_args.model_name_or_path)
        return dict(adapter=data_args.adapter, reference_adapter=not data_args.precompute_ref_log_probs)

    def dataset(self, runner, records, training: bool):
        return IndexedPairDataset(records, runner.processor) if training else runner.evaluator.dataset

    def collator(self, runner) -> IndexedPairCollator:
        return _collator(runner.processor, runner.model)

    def evaluator(self, runner) -> PairEvaluator:
        return PairEvaluator(runner.task, runner.processor, runner.eval_data, runner.model_args, runner.data_args,
                             runner.training_args)

    def trainer_kwargs(self, runner) -> dict:
        return dict(dpo_loss=DPOLoss.from_flags(runner.data_args),
                    reference=Reference(runner.model_args, runner.data_args, runner.training_args))

    def callbacks(self, runner) -> list[TrainerCallback]:
        return [_ReferenceAtTrainBegin(runner)]

    def card_method(self, data_args) -> str:
        extra = "".join(f", --{name} {getattr(data_args, name)}" for name, unset in
                        (("label_smoothing", 0.0), ("rpo_alpha", None)) if getattr(data_args, name) != unset)
        return f"DPO (--loss_type {data_args.loss_type}, --beta {data_args.beta}{extra})"

    def card_before(self, metric: str) -> str | None:
        # Before the first step the policy is the reference: every reward is 0.
        return "(the reference: 0 by construction)" if metric.startswith("rewards/") else None
