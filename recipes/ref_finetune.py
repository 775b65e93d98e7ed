"""Fine-tuning of the Rho-1 reference model (Sheared-LLaMA-2.7B) on CodeContests, full or LoRA, with FSDP2.

    tune run --nproc_per_node 4 recipes/ref_finetune.py --config configs/ref_tuning.yaml [key=value ...]

torchtune 0.6.1's `full_finetune_distributed` (or, for a LoRA model, `lora_finetune_distributed`) step for step,
plus validation, step checkpoints with an exact mid-epoch resume, a clean stop on SIGTERM, and the HF directories
Rho-1 loads (`checkpoint_best`, `checkpoint_final`; a LoRA run's merged, its adapter beside them). Tests check the
per-step losses against both stock recipes, on CPU with gloo.
"""

import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import ref_tuning  # noqa: F401, I001  first: it hides torchao's import-time warning before torchtune imports torchao

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed import destroy_process_group, init_device_mesh, init_process_group
from torch.distributed.distributed_c10d import _set_pg_timeout
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from ref_tuning import attention, lora, run_dir
from ref_tuning.atomic import WriteError, last_line
from ref_tuning.hf_checkpoint import CheckpointError
from ref_tuning.line_index import DataError
from ref_tuning.config import BOOL, COMPONENT, POSITIVE_INT, POSITIVE_NUMBER, SEED, STRING, ConfigError, is_off
from ref_tuning.config import one_line_errors, one_of, parse, raise_if_any, validate_config
from ref_tuning.step_checkpoints import HF_DIR, StepCheckpoints, load_state, rng_state, save_sharded, save_state
from ref_tuning.step_checkpoints import set_rng_state, sums_file, weight_sources
from ref_tuning.checksums import damaged

log = utils.get_logger("INFO")

# precision -> (dtype of the weights and optimizer state, dtype of the matmuls); see configs/ref_tuning.yaml.
PRECISIONS = dict(bf16_mixed=(torch.float32, torch.bfloat16), bf16=(torch.bfloat16,) * 2, fp32=(torch.float32,) * 2)
# Dense bf16 peak TFLOP/s per GPU by device name (vendor datasheets), for MFU when `peak_tflops` is null.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}

# Every top-level key the recipe reads, and what it takes; anything else is a mistake.
CONFIG_SCHEMA = {
    key: kind
    for kind, keys in (
        (STRING, "experiment output_dir"),
        (one_of("cuda", "cpu"), "device"),
        (one_of(*PRECISIONS), "precision"),
        (one_of("bf16", "fp32"), "output_dtype"),
        (SEED, "seed"),
        (BOOL, "compile shuffle enable_activation_checkpointing fsdp_reshard_after_forward"),
        (BOOL, "resume_from_checkpoint start_over"),
        (POSITIVE_INT, "batch_size val_batch_size epochs gradient_accumulation_steps"),
        (POSITIVE_INT, "keep_last_n_checkpoints log_every_n_steps"),
        (POSITIVE_INT.or_null(), "max_steps_per_epoch eval_every_n_steps save_every_n_steps"),
        (POSITIVE_NUMBER, "timeout_setup_s timeout_step_s"),
        (POSITIVE_NUMBER.or_null(), "peak_tflops clip_grad_norm"),
        (COMPONENT, "model tokenizer checkpointer dataset loss optimizer lr_scheduler metric_logger"),
        (COMPONENT.or_null(), "dataset_val"),
    )
    for key in keys.split()
}

# What a step checkpoint's train state holds and a resume restores.
COUNTERS = ("global_step", "epoch", "steps_in_epoch", "tokens_seen", "best_val_loss", "best_step")


class CollectiveTimeout(RuntimeError):
    """Another rank did not reach a collective of a training step within `timeout_step_s`."""


class NonFiniteError(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite: training stops, and no
    checkpoint is written from them."""


class _ValidationShard(Dataset):
    """This rank's share of the validation samples, padded with label-less copies of its first one
    so that every rank runs the same number of forward passes (FSDP gathers weights in each)."""

    def __init__(self, ds: Dataset, rank: int, world_size: int):
        self.ds, self._indices = ds, list(range(rank, len(ds), world_size))
        self._length = -(-len(ds) // world_size)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i < len(self._indices):
            return self.ds[self._indices[i]]
        sample = dict(self.ds[self._indices[0] if self._indices else 0])
        labels = sample["labels"]
        ignore = CROSS_ENTROPY_IGNORE_IDX
        sample["labels"] = torch.full_like(labels, ignore) if torch.is_tensor(labels) else [ignore] * len(labels)
        return sample


class RefFinetuneRecipe:
    """Full fine-tuning with FSDP2 (also on one process), gradient accumulation, AdamW and a cosine
    schedule with warmup, optional activation checkpointing; validation, step checkpoints, resume,
    preemption; metrics through torchtune's metric loggers and a progress bar on rank 0."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._param_dtype, self._compute_dtype = PRECISIONS[cfg.precision]
        self._output_dtype = training.get_dtype(cfg.output_dtype, self._device)
        if cfg.precision == "bf16":
            log.warning(
                "precision=bf16 keeps the weights in bf16: updates below half a weight's bf16 spacing (0.2-0.4% "
                "of its magnitude) round away, most AdamW steps at fine-tuning learning rates. "
                "precision=bf16_mixed keeps them (docs/precision.md)"
            )
        # Collectives wait `timeout_setup_s` while one rank works alone (the first run's data index,
        # checkpoint_best), and `timeout_step_s` in training steps, so that a hung rank is found early.
        self._timeout_setup = timedelta(seconds=cfg.timeout_setup_s)
        self._timeout_step = timedelta(seconds=cfg.timeout_step_s)
        # Not started by torchrun: a plain single process, a world of one, no rendezvous needed.
        world = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        init_process_group(training.get_distributed_backend(self._device.type), timeout=self._timeout_setup, **world)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        # Stop signals are agreed on over gloo, on the host: a check per step that never waits for the GPU
        # (on CPU too, where the default group is gloo already: one path, tested).
        self._host_group = dist.new_group(backend="gloo", timeout=self._timeout_step)

        self._cfg = cfg
        self._output_dir = Path(cfg.output_dir)
        self._grad_accum = cfg.gradient_accumulation_steps
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        # Optimizer steps done in all and in `epoch`; tokens trained on (responses), over all ranks.
        self.global_step = self.epoch = self.steps_in_epoch = self.tokens_seen = 0
        self._peak_flops = self._device_peak_flops(cfg.peak_tflops)
        self.best_val_loss = math.inf
        self.best_step: Optional[int] = None
        self._val_metrics: Dict[str, float] = {}
        self._lock = None  # rank 0's hold on the output directory (`run_dir.hold`), from setup to the end

        # Preemption (SIGTERM) and Ctrl-C (torchrun passes SIGINT on) only raise a flag: the step in
        # progress finishes and a checkpoint is written.
        self._stop_signal = 0
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stop_signal = max(self._stop_signal, signum)

    def _device_peak_flops(self, peak_tflops: Optional[float]) -> Optional[float]:
        if peak_tflops is None and self._device.type == "cuda":
            name = torch.cuda.get_device_name(self._device)
            peak_tflops = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
            if peak_tflops is None:
                utils.log_rank_zero(log, f"no known peak for {name}: set peak_tflops to log MFU")
        return peak_tflops * 1e12 if peak_tflops else None

    @contextmanager
    def _collective_timeout(self, timeout: timedelta):
        """Collectives inside wait up to `timeout`, then the training steps' timeout again."""
        _set_timeout(timeout)
        try:
            yield
        finally:
            _set_timeout(self._timeout_step)

    # -----------------------------------------------------------------------------------------
    # Setup

    def setup(self, cfg: DictConfig) -> None:
        # Whose directory this is first: a run never overwrites another or resumes one it is not.
        run_dir.check(self._output_dir, cfg, self.world_size)
        self._hold_output_dir()
        # Data next: a batch larger than the data, or bad data, fails before any model is built.
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = config.instantiate(cfg.loss)
        if cfg.compile:
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        self._sampler, self._dataloader = self._setup_data(cfg.dataset, cfg.shuffle, cfg.batch_size)
        self._val_dataloader = None
        if not is_off(cfg.get("dataset_val")):  # `dataset_val=null` turns validation off
            self._val_dataloader = self._setup_val_data(cfg.dataset_val, cfg.val_batch_size)
        self._data_files = self._check_data_files(cfg)
        self._steps_per_epoch = len(self._dataloader) // self._grad_accum
        if self._steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset gives {len(self._dataloader)} batches per rank, fewer than "
                f"gradient_accumulation_steps={self._grad_accum}: one optimizer step needs "
                f"batch_size * gradient_accumulation_steps * world_size = "
                f"{cfg.batch_size * self._grad_accum * self.world_size} samples, and the "
                f"dataset has {len(self._dataloader.dataset)}; lower batch_size or raise dataset.n_samples"
            )
        self._steps_per_epoch = min(self._steps_per_epoch, cfg.max_steps_per_epoch or self._steps_per_epoch)
        ds, rows = self._dataloader.dataset, cfg.batch_size * self._grad_accum * self.world_size
        held = f"{rows} samples"
        if getattr(ds, "packed", False):  # another builder's dataset may have no `packed`
            held = f"{rows} rows, about {rows * len(ds.samples) / len(ds):.0f} samples"
        utils.log_rank_zero(
            log,
            f"an optimizer step: {held} ({cfg.batch_size} x {self._grad_accum} x {self.world_size} processes); "
            f"{self._steps_per_epoch} steps an epoch",
        )

        self._checkpoints = StepCheckpoints(self._output_dir / "checkpoints", cfg.keep_last_n_checkpoints)
        resume = self._checkpoints.newest() if cfg.resume_from_checkpoint else None
        skipped = [p.name for p in self._checkpoints.incomplete()] if cfg.resume_from_checkpoint else []
        if skipped:
            utils.log_rank_zero(
                log, f"skipping {', '.join(skipped)} in {self._checkpoints.root}: incomplete (no train_state.pt)"
            )
        if cfg.resume_from_checkpoint and resume is None:
            utils.log_rank_zero(log, f"no checkpoint in {self._checkpoints.root}: starting from the base model")
        if self._is_rank_zero:
            _check_tracking_uri(cfg.metric_logger)
            try:
                self._metric_logger = config.instantiate(cfg.metric_logger)
            except ImportError as e:  # TensorBoardLogger without tensorboard, WandBLogger without wandb
                raise ConfigError(
                    f"config key 'metric_logger': {cfg.metric_logger._component_} needs a package that is not "
                    f"installed ({e}); install it (pip install tensorboard, for TensorBoardLogger) or use "
                    "torchtune.training.metric_logging.DiskLogger"
                ) from e
            self._metric_logger.log_config(cfg)
        self._checkpointer = config.instantiate(cfg.checkpointer)
        # Built on the meta device (filled shard by shard later, so no rank holds a full copy), and
        # checked against the checkpoint before anything is written.
        with training.set_default_dtype(self._param_dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        self._check_against_checkpoint(model)
        self._lora = lora.lora_settings(model)  # None: full fine-tuning
        if self._lora:
            set_trainable_params(model, get_adapter_params(model))

        # Read by rank 0 alone (memory-mapped, pages read as FSDP scatters them from rank 0's copy).
        # A resumed run reads its weights from the step checkpoint's shards instead, in `_resume`; a LoRA
        # run's step checkpoints hold only the adapters, so it reads the base here either way.
        load = not resume or self._lora
        model_state = self._checkpointer.load_checkpoint(rank_zero_only=True)[training.MODEL_KEY] if load else None
        self._model = self._setup_model(model, model_state, cfg)
        del model_state
        self._model_flops = self._flops_constants(self._model)
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._optimizer = config.instantiate(cfg.optimizer, trainable)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        total_steps = self.total_epochs * self._steps_per_epoch
        self._lr_scheduler = config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=total_steps)
        if resume is not None:
            self._resume(resume)
        # Only now, with every input read and checked, is the directory this run's: a run that failed
        # before this point leaves nothing but its log (`logs/`).
        dist.barrier()
        if self._is_rank_zero:
            run_dir.record(self._output_dir, cfg, self.world_size, self._data_files)
        dist.barrier()
        # Labels are shifted left by one; the last position of every row predicts nothing.
        # Validation batches are no larger than a rank's share of the samples, whatever val_batch_size says.
        val_rows = len(self._val_dataloader.dataset) if self._val_dataloader is not None else 0
        rows = max(cfg.batch_size, min(cfg.val_batch_size, val_rows))
        self._ignore_labels_cache = torch.full((rows, 1), self._loss_fn.ignore_index, device=self._device)

    def _hold_output_dir(self) -> None:
        """Rank 0 holds the output directory until this run ends; every rank stops if another run holds it."""
        refused = [None]
        if self._is_rank_zero:
            try:
                self._lock = run_dir.hold(self._output_dir)
            except run_dir.RunDirError as e:
                refused[0] = str(e)
        dist.broadcast_object_list(refused, src=0)
        if refused[0]:
            raise run_dir.RunDirError(refused[0])

    def _check_data_files(self, cfg: DictConfig) -> Dict[str, Dict[str, str]]:
        """The splits' files and fingerprints, checked on resume against those the run began with."""
        datasets = {"dataset": self._dataloader.dataset}
        if self._val_dataloader is not None:
            datasets["dataset_val"] = self._val_dataloader.dataset.ds
        files = {
            key: {"jsonl": str(Path(ds.jsonl).resolve()), "fingerprint": ds.fingerprint}
            for key, ds in datasets.items()
            if hasattr(ds, "fingerprint")  # another dataset builder's: not known
        }
        run_dir.check_data(self._output_dir, cfg, files)
        return files

    def release_output_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _setup_model(
        self, model: torch.nn.Module, model_state_dict: Optional[Dict], cfg: DictConfig
    ) -> torch.nn.Module:
        """Shard the meta-device `model` and fill it from the full state dict (or leave it empty for a resume)."""
        if cfg.compile:  # per layer, as torchtune's recipes do, with flex attention inside each layer's graph
            attention.trace_flex_attention(model)
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        mesh = init_device_mesh(self._device.type, (self.world_size,), mesh_dim_names=("dp",))
        # torchtune's `shard_model` takes no mixed-precision policy: the same loop, with one. Under
        # bf16_mixed, FSDP gathers bf16 copies of the fp32 weights and reduces gradients in fp32.
        mixed = self._compute_dtype != self._param_dtype
        dtypes = dict(param_dtype=self._compute_dtype, reduce_dtype=torch.float32) if mixed else {}
        policy = MixedPrecisionPolicy(**dtypes)
        fsdp = dict(reshard_after_forward=cfg.fsdp_reshard_after_forward, mesh=mesh, mp_policy=policy)
        for name, module in reversed(list(model.named_modules())):
            if training.get_shard_conditions(name, module):
                fully_shard(module, **fsdp)
        fully_shard(model, **fsdp)
        if model_state_dict is None:  # to be filled from a step checkpoint
            model.to_empty(device=self._device)
        with training.set_default_dtype(self._param_dtype), self._device:
            for m in model.modules():
                if isinstance(m, LoRALinear):  # adapters are not in the base checkpoint: A random, B zero
                    m.to_empty(device=self._device)
                    m.initialize_parameters()
                if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                    m.rope_init()
        if model_state_dict is not None:
            missing, unexpected = training.load_from_full_model_state_dict(
                model, model_state_dict, self._device, strict=not self._lora
            )
            if [k for k in missing if ".lora_" not in k] or unexpected:  # only a LoRA run's adapters may be missing
                raise CheckpointError(f"the checkpoint lacks {missing[:3]} or has unexpected {unexpected[:3]}")
        training.validate_no_params_on_meta_device(model)
        n_params = sum(p.numel() for p in model.parameters())
        dtypes = f"{n_params:,} parameters in {self._param_dtype}, computing in {self._compute_dtype}"
        if self._lora:
            n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            dtypes += f"; LoRA r={self._lora['r']} on {', '.join(self._lora['target_modules'])}: {n_trained:,} train"
        utils.log_rank_zero(log, f"model built: {dtypes}, sharded over {self.world_size}")
        if self._is_rank_zero and self._device.type == "cuda":  # memory stats raise on CPU
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        dist.barrier()
        return model

    def _check_against_checkpoint(self, model: torch.nn.Module) -> None:
        """The model the config builds must be the checkpoint's shape: say which key differs."""
        hf = self._checkpointer.config
        embeddings = model.tok_embeddings
        built = dict(vocab_size=embeddings.num_embeddings, hidden_size=embeddings.embedding_dim)
        built["num_hidden_layers"] = len(model.layers)
        wrong = [
            f"{key} {hf.get(key)} in the checkpoint, {n} in the model" for key, n in built.items() if hf.get(key) != n
        ]
        if wrong:
            raise CheckpointError(
                f"config key 'model' ({self._cfg.model._component_}) builds another shape than the checkpoint "
                f"{self._cfg.checkpointer.checkpoint_dir}/config.json: {'; '.join(wrong)}. Set the model's arguments "
                "(e.g. model.vocab_size) to the checkpoint's, or point checkpointer.checkpoint_dir at its model"
            )

    @staticmethod
    def _flops_constants(model: torch.nn.Module) -> Dict[str, int]:
        """FLOPs of a training step (forward and backward, no recomputation), as in PaLM's MFU:
        6 per weight (all but the embedding lookup) per token, 4 per frozen one (LoRA's base: no weight
        gradient), and for causal attention 12 * layers * embed_dim per token per position it attends to
        (QK^T and AV: 4 * dim each, forward)."""
        params = [p for n, p in model.named_parameters() if "tok_embeddings" not in n]
        per_token = sum((6 if p.requires_grad else 4) * p.numel() for p in params)
        return {"per_token": per_token, "per_attended": 12 * len(model.layers) * model.tok_embeddings.embedding_dim}

    def _collate_fn(self, ds: Dataset):
        if getattr(ds, "packed", False):  # rows of max_seq_len; a block-causal mask per sample (`_to_device`)
            return attention.collate_packed
        return partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._loss_fn.ignore_index)

    def _setup_data(self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int):
        ds = config.instantiate(cfg_dataset, self._tokenizer)
        sampler = StatefulDistributedSampler(ds, self.world_size, self.rank, shuffle=shuffle, seed=self.seed)
        # drop_last: equal batch counts on every rank, so no rank waits on a collective forever
        pin = self._device.type == "cuda"  # so that `_to_device` copies without waiting
        loader = StatefulDataLoader(
            ds, batch_size, sampler=sampler, collate_fn=self._collate_fn(ds), drop_last=True, pin_memory=pin
        )
        return sampler, loader

    def _setup_val_data(self, cfg_dataset: DictConfig, batch_size: int) -> DataLoader:
        ds = config.instantiate(cfg_dataset, self._tokenizer)
        shard = _ValidationShard(ds, self.rank, self.world_size)
        pin = self._device.type == "cuda"
        return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=self._collate_fn(ds), pin_memory=pin)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The batch on the device, copied from pinned memory without waiting; packed rows' mask built there."""
        batch = {key: value.to(self._device, non_blocking=True) for key, value in batch.items()}
        if "document_ids" in batch:
            batch["mask"] = attention.block_causal_mask(batch.pop("document_ids"))
        return batch

    def _damaged(self, path: Path, error: BaseException | str) -> CheckpointError:
        older = [p for _, p in self._checkpoints.complete() if p != path]
        fix = "no earlier complete checkpoint is left: start over (start_over=true)"
        if older:
            fix = f"delete it (rm -r {path}) and resume again to continue from the previous complete checkpoint, "
            fix += str(older[-1])
        if isinstance(error, str):
            return CheckpointError(f"{error}; {fix}")
        return CheckpointError(f"{path}: cannot be read, it is damaged ({last_line(error)}); {fix}")

    def _resume(self, path: Path) -> None:
        try:  # a LoRA run's checkpoint holds only adapters: told apart before DCP calls it a missing key
            lora_checkpoint = any(".lora_" in name for name in weight_sources(path))
        except CheckpointError as e:  # a shard missing or cut short
            raise self._damaged(path, e) from None
        except Exception:  # no readable metadata: load_state below says so
            lora_checkpoint = bool(self._lora)
        if lora_checkpoint != bool(self._lora):
            held, now = (
                ("a LoRA run's adapters", "the full model") if lora_checkpoint else ("a full run's weights", "LoRA")
            )
            raise CheckpointError(
                f"{path}: holds {held}, but this config trains {now}; resume with the model settings the run "
                "began with (model._component_ and its keys), or start another experiment=NAME"
            )
        problem = damaged(path, sums_file(self.rank))  # this rank's files, as it wrote them
        if problem:
            raise self._damaged(path, problem.split("; ")[0])  # the file, less the advice for HF directories
        try:
            train_state, rank_state = load_state(path, self._model, self._optimizer)
        except (Exception, dcp.CheckpointException) as e:  # a truncated or corrupt file (DCP raises a BaseException)
            raise self._damaged(path, e) from None
        if train_state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path}: written by {train_state['world_size']} processes, this run has "
                f"{self.world_size}; resume with --nproc_per_node {train_state['world_size']}"
            )
        self._lr_scheduler.load_state_dict(train_state["lr_scheduler"])
        for key in COUNTERS:
            setattr(self, key, train_state[key])
        if self.steps_in_epoch < self._steps_per_epoch:  # else the next epoch starts afresh
            self._dataloader.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"])
        utils.log_rank_zero(log, f"resumed from {path} (step {self.global_step}, epoch {self.epoch + 1})")

    # -----------------------------------------------------------------------------------------
    # Training

    def _train_epochs(self, pbar: tqdm, history: list) -> bool:
        """Every remaining step; False if stopped early by SIGTERM or SIGINT. Steps run without waiting for the
        GPU; their metrics are read on log steps, and before validation and checkpoints."""
        pending = []  # steps whose metrics are still on the device
        self._interval_start = time.perf_counter()
        while self.epoch < self.total_epochs:
            self._sampler.set_epoch(self.epoch)
            batches = iter(self._dataloader)  # mid-epoch after a resume: its state was loaded
            while self.steps_in_epoch < self._steps_per_epoch:
                pending.append(self._train_step(batches))
                self.global_step += 1
                self.steps_in_epoch += 1
                pbar.update(1)
                stop_signal = self._stop_signal_of_any_rank()
                every = self._cfg.eval_every_n_steps
                validating = self._val_dataloader is not None and every and self.global_step % every == 0
                every = self._cfg.save_every_n_steps
                saving = bool(every and self.global_step % every == 0)
                last = self.global_step == self.total_epochs * self._steps_per_epoch
                log_now = self.global_step % self._cfg.log_every_n_steps == 0 or validating or last
                if not (log_now or saving or stop_signal):
                    continue
                metrics = self._read_steps(pending)
                pending = []
                history.append(metrics)
                tok_s = f"{metrics['tokens_per_second_per_gpu']:.0f}"
                pbar.set_postfix(
                    epoch=self.epoch + 1, loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=tok_s
                )
                if validating:
                    metrics.update(self.validate())
                if self._is_rank_zero and log_now:
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                if stop_signal:
                    with self._collective_timeout(self._timeout_setup):
                        path = self.save_checkpoint()
                    stopped = f"{signal.Signals(stop_signal).name}: stopped after step {self.global_step}"
                    utils.log_rank_zero(
                        log, f"{stopped}, checkpoint {path}; run again with resume_from_checkpoint=true to continue"
                    )
                    return False
                if saving:
                    with self._collective_timeout(self._timeout_setup):  # rank 0 commits and rotates alone
                        self.save_checkpoint()
                self._interval_start = time.perf_counter()  # rates leave validation and saves out
            self.epoch += 1
            self.steps_in_epoch = 0
        if pending:
            history.append(self._read_steps(pending))
        return True

    def train(self) -> None:
        if self._device.type == "cuda":  # torch.cpu has no empty_cache
            training.cleanup_before_training()
        total_steps = self.total_epochs * self._steps_per_epoch
        start, start_step, start_tokens = time.perf_counter(), self.global_step, self.tokens_seen
        history = []  # per-step rates for the summary
        pbar = tqdm(total=total_steps, initial=self.global_step, disable=not self._is_rank_zero, desc="training")
        _set_timeout(self._timeout_step)
        try:
            finished = self._train_epochs(pbar, history)
        except RuntimeError as e:  # gloo raises RuntimeError; NCCL's watchdog aborts the process itself
            if "timed out" not in str(e).lower():
                raise
            raise CollectiveTimeout(
                f"after training step {self.global_step}: a collective waited longer than timeout_step_s="
                f"{self._timeout_step.total_seconds():g} s for another process, which hung or died. Check the "
                "other ranks' logs; raise timeout_step_s if steps are legitimately that slow; continue with "
                f"resume_from_checkpoint=true ({e})"
            ) from None
        pbar.close()
        if not finished:
            return
        if self._val_dataloader is not None and self._val_metrics.get("step") != self.global_step:
            metrics = self.validate()  # at the end too, unless the last step was just validated
            if self._is_rank_zero:
                self._metric_logger.log_dict(metrics, step=self.global_step)
        wall = time.perf_counter() - start
        best = f", best validation loss {self.best_val_loss:.4f} at step {self.best_step}" if self.best_step else ""
        steps = f"{self.global_step} steps ({self.global_step - start_step} in this run)"
        utils.log_rank_zero(
            log, f"done: {steps}, {self.tokens_seen - start_tokens:,} tokens trained on in {wall:.0f} s{best}"
        )
        utils.log_rank_zero(log, self._summary(history))

    def _read_steps(self, pending: list) -> Dict[str, float]:
        """The metrics of the steps since the last read, in one wait for the GPU: every step's loss and gradient
        norm checked, its tokens counted; the last step's loss, and rates since the last read: tokens/s per GPU,
        trained (responses) and all non-padding (the compute rate), MFU, and peak memory on CUDA."""
        rows = torch.stack([values for values, _ in pending]).tolist()
        seconds = time.perf_counter() - self._interval_start
        for step, (loss_sum, tokens, *_, grad_norm) in enumerate(rows, self.global_step - len(rows) + 1):
            loss = loss_sum / tokens if tokens else math.nan
            if not math.isfinite(loss):
                self._stop_non_finite(f"the training loss is {loss}", step)
            if not math.isfinite(grad_norm):
                self._stop_non_finite(f"the gradient norm is {grad_norm}", step)
        tokens, all_tokens, attended = (sum(row[i] for row in rows) for i in (1, 2, 3))
        self.tokens_seen += int(tokens)
        (loss_sum, last_tokens, _, _, grad_norm), lr = rows[-1], pending[-1][1]
        metrics = {"loss": loss_sum / last_tokens, "lr": lr, "tokens": int(last_tokens)}
        metrics |= {"grad_norm": grad_norm} if self._cfg.clip_grad_norm is not None else {}
        per_gpu = seconds * self.world_size
        metrics |= {
            "tokens_per_second_per_gpu": tokens / per_gpu,
            "all_tokens_per_second_per_gpu": all_tokens / per_gpu,
        }
        flops = self._model_flops["per_token"] * all_tokens + self._model_flops["per_attended"] * attended
        if self._peak_flops:
            metrics["mfu"] = flops / per_gpu / self._peak_flops
        if self._device.type == "cuda":
            metrics.update(training.get_memory_stats(device=self._device))
        return metrics

    def _summary(self, history: list) -> str:
        """Medians over this run's reads of the metrics (`_read_steps`), less the first (lazy initialization,
        compilation) where there are others."""
        steps = history[1:] or history
        if not steps:
            return "no training step in this run"

        def median(key: str) -> float:
            return statistics.median(m[key] for m in steps)

        every = self._cfg.log_every_n_steps
        line = f"per GPU, median of {len(steps)} {'steps' if every == 1 else f'reads every {every} steps'}: "
        line += f"{median('tokens_per_second_per_gpu'):,.0f} trained tokens/s, "
        line += f"{median('all_tokens_per_second_per_gpu'):,.0f} non-padding tokens/s"
        if "mfu" in steps[0]:
            line += f", MFU {median('mfu'):.1%}"
        peaks = [(m["peak_memory_alloc"], m["peak_memory_reserved"]) for m in history if "peak_memory_alloc" in m]
        if peaks:
            alloc, reserved = map(max, zip(*peaks))
            line += f", peak memory {alloc:.1f} GiB allocated, {reserved:.1f} GiB reserved"
        return line

    def _train_step(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, float]:
        """Gradient accumulation over micro-batches, then one optimizer step (torchtune's math), with no wait
        for the GPU: the summed loss, the tokens trained, non-padding and attended, and the gradient norm (0
        without clipping) in one tensor on the device, for `_read_steps`; and the learning rate."""
        running_loss = 0
        counts = torch.zeros(3, dtype=torch.int64, device=self._device)  # trained, non-padding, attended positions
        for _ in range(self._grad_accum):
            batch = self._to_device(next(batches))
            current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
            real = batch["tokens"] != self._tokenizer.pad_id
            pos = batch.get("input_pos")  # packed rows restart positions at each sample
            pos = torch.arange(real.shape[-1], device=real.device) if pos is None else pos
            counts += torch.stack([current_num_tokens, real.sum(), ((pos + 1) * real).sum()])
            labels = batch.pop("labels")
            logits = self._model(**batch)
            labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
            if not isinstance(logits, list):
                labels = labels.reshape(-1)
                logits = logits.reshape(-1, logits.size(-1))
            # Summed over tokens here, divided by the tokens of all ranks and micro-batches at the step.
            current_loss = self._loss_fn(logits, labels) * current_num_tokens
            del logits
            running_loss += current_loss.detach()
            current_loss.backward()

        dist.all_reduce(counts)
        dist.all_reduce(running_loss)
        # FSDP2 averages gradients over ranks; undo that and divide by the token count.
        training.scale_grads(self._model, self.world_size / counts[0])
        grad_norm = torch.zeros((), device=self._device)
        if self._cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._cfg.clip_grad_norm)
            if isinstance(grad_norm, DTensor):  # sharded: the norm over all ranks
                grad_norm = grad_norm.full_tensor()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._lr_scheduler.step()
        values = torch.cat([running_loss.reshape(1).double(), counts.double(), grad_norm.reshape(1).double()])
        return values, get_lr(self._optimizer)

    def _stop_non_finite(self, what: str, step: int) -> None:
        # A resume would repeat the same steps, and a changed optimizer.lr or clip_grad_norm is another run.
        newest = self._checkpoints.newest()
        since = ""
        if newest is not None:
            since = f"; from the newest checkpoint, {newest} (finite weights, though the run may have begun to "
            since += f"diverge before it): python -m ref_tuning.convert step-to-hf {newest} DIR, then a new "
            since += "experiment=NAME with checkpointer.checkpoint_dir=DIR"
        raise NonFiniteError(
            f"{what} at step {step} (epoch {self.epoch + 1}); no checkpoint is written from it. Train with a lower "
            f"optimizer.lr or a clip_grad_norm (or check the data): from the start with start_over=true{since}"
        )

    def _check_finite_weights(self) -> None:
        """Before any checkpoint: a loss can stay finite for a step after the weights overflow."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self._model.parameters()]
        bad = (~torch.stack([torch.isfinite(p).all() for p in local]).all()).int()  # one device sync, not one a tensor
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self._stop_non_finite("the weights are not finite", self.global_step)

    def _stop_signal_of_any_rank(self) -> int:
        """SIGTERM or SIGINT if any rank received one, else 0: all ranks must agree, to save the same checkpoint."""
        flag = torch.tensor(self._stop_signal)  # on the host
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return int(flag)

    # -----------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Loss, perplexity and next-token accuracy over the response tokens of the validation
        split, summed over all ranks; saves `checkpoint_best` when the loss is the lowest yet."""
        with self._collective_timeout(self._timeout_setup):  # ranks wait while rank 0 writes checkpoint_best
            return self._validate()

    def _validate(self) -> Dict[str, float]:
        self._model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self._device)  # loss sum, tokens, correct
        ignore = self._loss_fn.ignore_index
        for batch in self._val_dataloader:
            batch = self._to_device(batch)
            labels = batch.pop("labels")
            labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
            logits = self._model(**batch)
            chunks = logits if isinstance(logits, list) else [logits]  # chunked along the sequence
            for chunk, chunk_labels in zip(chunks, labels.chunk(len(chunks), dim=1)):
                mask = chunk_labels != ignore
                x, y = chunk.float().flatten(0, 1), chunk_labels.flatten()
                totals[0] += torch.nn.functional.cross_entropy(x, y, ignore_index=ignore, reduction="sum")
                totals[1] += mask.sum()
                totals[2] += ((chunk.argmax(-1) == chunk_labels) & mask).sum()
        dist.all_reduce(totals)
        self._model.train()
        loss = (totals[0] / totals[1]).item()
        metrics = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}
        metrics |= {"val_accuracy": (totals[2] / totals[1]).item(), "val_tokens": int(totals[1].item())}
        self._val_metrics = dict(metrics, step=self.global_step)
        if loss < self.best_val_loss:
            self.best_val_loss, self.best_step = loss, self.global_step
            self._save_output("checkpoint_best")
        return metrics

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def _gathered_model(self) -> Dict[str, Any]:
        """What the checkpointer writes, on rank 0 (every rank takes part in the gather): the full weights in
        `output_dtype`, a LoRA model's merged, with its adapters and settings beside them as torchtune passes them."""
        state_dict = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        adapter = {}
        if self._lora and self._is_rank_zero:
            state_dict, adapter = lora.merge(state_dict, self._lora)
        for name in state_dict:  # one tensor at a time: the fp32 dict and one cast tensor at most
            state_dict[name] = state_dict[name].to(self._output_dtype)
        adapter = {training.ADAPTER_KEY: adapter, training.ADAPTER_CONFIG: self._lora} if adapter else {}
        return {training.MODEL_KEY: state_dict} | adapter

    def _save_output(self, name: str) -> None:
        """An HF directory for Rho-1, `output_dir/name`, with the step, metrics, config and the samples trained
        on in `ref_tuning.json`; for a LoRA run also the adapter alone, `output_dir/adapter_*` (PEFT layout)."""
        self._check_finite_weights()
        checkpoint = self._gathered_model()
        if self._is_rank_zero:
            epoch = self.epoch + (1 if self.steps_in_epoch else 0)  # after the last epoch, `epoch` counts it already
            metadata = {"step": self.global_step, "epoch": epoch, "validation": self._val_metrics}
            metadata["config"] = OmegaConf.to_container(self._cfg, resolve=True)
            metadata["world_size"] = self.world_size  # with the config, the run's identity (`run_dir.identity`)
            metadata |= {"lora": self._lora} if self._lora else {}
            metadata["trained_on"] = self._trained_on()  # last: a line number per sample
            try:
                path = self._checkpointer.save_checkpoint(checkpoint, name=name, metadata=metadata)
            except WriteError as e:
                newest = self._checkpoints.newest()
                again = f"resume (resume_from_checkpoint=true) from {newest}" if newest else "run again"
                raise WriteError(f"{e}; {self._output_dir / name} is as it was: free space, then {again}") from e
            log.info(f"HF checkpoint written to {path} (step {self.global_step})")
        del checkpoint
        dist.barrier()

    def _trained_on(self) -> Dict[str, Any]:
        """The training split and the line of every sample drawn, for the report's memorization section."""
        ds = self._dataloader.dataset
        samples = getattr(ds, "samples", ds)  # packed rows hold the samples
        trained = {"jsonl": str(Path(samples.jsonl).resolve()), "fingerprint": samples.fingerprint}
        return trained | {"lines": samples.lines.tolist()}

    def save_checkpoint(self) -> Path:
        """A step checkpoint: weights and optimizer (each rank its own shards, in parallel), schedule,
        data position, RNG states, counters."""
        self._check_finite_weights()
        start = time.perf_counter()
        tmp = self._checkpoints.begin(self.global_step)
        try:
            save_sharded(tmp, self._model, self._optimizer)
            if self._is_rank_zero:
                self._checkpointer.save_config(tmp / HF_DIR)
            train_state = {key: getattr(self, key) for key in (*COUNTERS, "world_size", "seed")}
            train_state["lr_scheduler"] = self._lr_scheduler.state_dict()
            rank_state = {"dataloader": self._dataloader.state_dict(), "rng": rng_state()}
            save_state(tmp, train_state, rank_state)
        except (OSError, RuntimeError, dcp.CheckpointException) as e:  # a full disk: torch's zip writer, DCP's wrap
            raise self._checkpoints.abandon(tmp, self.global_step, e) from e
        path = self._checkpoints.commit(tmp, self.global_step)
        utils.log_rank_zero(log, f"checkpoint written to {path} in {time.perf_counter() - start:.1f} s")
        return path

    def save_final(self) -> None:
        with self._collective_timeout(self._timeout_setup):
            self._save_output("checkpoint_final")

    def cleanup(self) -> None:
        self._checkpoints.wait()
        if self._is_rank_zero:
            self._metric_logger.close()
        destroy_process_group()


def _set_timeout(timeout: timedelta) -> None:
    """Change how long collectives wait, once every rank is here: none is left inside a collective that
    still runs under the old timeout (as torchtitan's `set_pg_timeouts` does)."""
    dist.barrier()
    _set_pg_timeout(timeout)


def _check_tracking_uri(node: DictConfig) -> None:
    """MLflow retries a server it cannot reach for minutes, and meets a store it cannot write with six chained
    tracebacks: one try each, and one line."""
    uri = str(node.get("tracking_uri") or "")
    where = urllib.parse.urlparse(uri)
    key = "config key 'metric_logger.tracking_uri'"
    if where.scheme in ("http", "https"):
        try:
            socket.create_connection((where.hostname, where.port or 80), timeout=5).close()
        except OSError as e:
            raise ConfigError(
                f"{key}: cannot reach {uri} ({e.strerror or e}); start the MLflow server, or log to a folder "
                "(tracking_uri=file:PATH)"
            ) from None
    elif uri and where.scheme in ("file", ""):
        folder = Path(where.path)
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        try:
            tempfile.TemporaryDirectory(dir=existing).cleanup()
        except OSError as e:
            raise ConfigError(
                f"{key}: {uri}: cannot write in {existing} ({e.strerror}); choose a folder you can write"
            ) from None


def _check_values(cfg: DictConfig) -> None:
    """What the schema cannot say, checked before anything is built."""
    errors = []
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        errors.append(f"config key 'optimizer.lr': expected a positive number, got {lr!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        errors.append(
            f"config key 'device': cuda, but torch {torch.__version__} sees no CUDA device here; run on a GPU "
            "machine (with a CUDA build of torch), or set device=cpu for tiny models"
        )
    raise_if_any(errors)


@parse
def recipe_main(cfg: DictConfig) -> None:
    with one_line_errors(
        ConfigError, DataError, CheckpointError, run_dir.RunDirError, NonFiniteError, CollectiveTimeout, WriteError
    ):
        run(cfg)


def run(cfg: DictConfig) -> None:
    try:
        validate_config(cfg, CONFIG_SCHEMA)
        _check_values(cfg)
    except ConfigError as e:
        if "dtype" in cfg:  # the key of earlier versions
            raise ConfigError(
                f"{e}\n  'dtype' is now 'precision' (bf16_mixed: fp32 master weights and bf16 compute; "
                "bf16; fp32), with 'output_dtype' (bf16 or fp32) for checkpoint_best/final"
            ) from None
        raise
    config.log_config(recipe_name="RefFinetuneRecipe", cfg=cfg)
    recipe = RefFinetuneRecipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
        if recipe.epoch >= recipe.total_epochs:  # not stopped early by SIGTERM or SIGINT
            recipe.save_final()
        recipe.cleanup()
    finally:  # at once, also after an error: a caller in the same process may start the next run here
        recipe.release_output_dir()


if __name__ == "__main__":
    sys.exit(recipe_main())
