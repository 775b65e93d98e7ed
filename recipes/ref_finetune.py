"""Full fine-tuning of the Rho-1 reference model (Sheared-LLaMA-2.7B) on CodeContests, with FSDP2.

    tune run --nproc_per_node 4 recipes/ref_finetune.py --config configs/ref_tuning.yaml [key=value ...]

Built from torchtune 0.6.1 pieces and following its `full_finetune_distributed` recipe step for
step (same loss normalization, so per-step losses match it); it also runs on CPU with gloo, and
writes the result as a complete HF directory (`output_dir/checkpoint_final`) for the Rho-1 stage.
"""

import os
import sys
import time
from functools import partial
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed import destroy_process_group, init_device_mesh, init_process_group
from torch.distributed.tensor import DTensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from ref_tuning.config import validate_config

log = utils.get_logger("INFO")

# Every top-level key the recipe reads; anything else in a config is a mistake.
CONFIG_KEYS = {
    "experiment", "output_dir", "device", "dtype", "seed",
    "model", "tokenizer", "checkpointer", "dataset", "loss", "optimizer", "lr_scheduler",
    "batch_size", "shuffle", "epochs", "max_steps_per_epoch", "gradient_accumulation_steps",
    "clip_grad_norm", "enable_activation_checkpointing", "fsdp_reshard_after_forward",
    "metric_logger", "log_every_n_steps",
}  # fmt: skip


class RefFinetuneRecipe:
    """Full fine-tuning with FSDP2 (also on one process), gradient accumulation, AdamW and a
    cosine schedule with warmup, optional activation checkpointing, a metric logger and a progress
    bar on rank 0; saves an HF checkpoint for Rho-1 at the end."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        backend = training.get_distributed_backend(self._device.type)
        if "RANK" in os.environ:  # started by torchrun
            init_process_group(backend)
        else:  # a plain single process: a world of one, no rendezvous needed
            init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.log_every_n_steps
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.clip_grad_norm
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0

    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        self._checkpointer = config.instantiate(cfg.checkpointer)
        checkpoint_dict = self._checkpointer.load_checkpoint()
        self._model = self._setup_model(
            cfg.model,
            model_state_dict=checkpoint_dict[training.MODEL_KEY],
            enable_activation_checkpointing=cfg.enable_activation_checkpointing,
            reshard_after_forward=cfg.fsdp_reshard_after_forward,
        )
        del checkpoint_dict
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())

        self._loss_fn = config.instantiate(cfg.loss)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        self._sampler, self._dataloader = self._setup_data(cfg.dataset, cfg.shuffle, cfg.batch_size)
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"the dataset gives {len(self._dataloader)} batches per rank, fewer than "
                f"gradient_accumulation_steps={self._gradient_accumulation_steps}: one optimizer step needs "
                f"batch_size * gradient_accumulation_steps * world_size = "
                f"{cfg.batch_size * self._gradient_accumulation_steps * self.world_size} samples, and the "
                f"dataset has {len(self._dataloader.dataset)}; lower batch_size or raise dataset.n_samples"
            )
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)

        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
        )
        # Labels are shifted left by one; the last position of every row predicts nothing.
        self._ignore_labels_cache = torch.full(
            (cfg.batch_size, 1), self._loss_fn.ignore_index, device=self._device
        )

    def _setup_model(
        self,
        cfg_model: DictConfig,
        model_state_dict: Dict[str, Any],
        enable_activation_checkpointing: bool,
        reshard_after_forward: bool,
    ) -> torch.nn.Module:
        # Built on the meta device and filled shard by shard, so no rank holds a full copy.
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        if enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        mesh = init_device_mesh(self._device.type, (self.world_size,), mesh_dim_names=("dp",))
        training.shard_model(
            model=model,
            shard_conditions=[training.get_shard_conditions],
            cpu_offload=False,
            reshard_after_forward=reshard_after_forward,
            dp_mesh=mesh,
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                    m.rope_init()
        training.load_from_full_model_state_dict(model, model_state_dict, self._device, strict=True)
        training.validate_no_params_on_meta_device(model)
        if self._is_rank_zero and self._device.type == "cuda":  # memory stats raise on CPU
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        dist.barrier()
        return model

    def _setup_data(self, cfg_dataset: DictConfig, shuffle: bool, batch_size: int):
        ds = config.instantiate(cfg_dataset, self._tokenizer)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed
        )
        if ds.packed:  # rows of max_seq_len with a block-causal mask per sample
            collate_fn = padded_collate_packed
        else:
            collate_fn = partial(
                padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._loss_fn.ignore_index
            )
        dataloader = StatefulDataLoader(
            dataset=ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            # equal batch counts on every rank, so no rank waits on a collective forever
            drop_last=True,
        )
        return sampler, dataloader

    def train(self) -> None:
        if self._device.type == "cuda":  # torch.cpu has no empty_cache
            training.cleanup_before_training()
        self._optimizer.zero_grad()
        t0 = time.perf_counter()
        running_loss, num_tokens = 0, 0
        total_steps = self.total_epochs * self._steps_per_epoch
        pbar = tqdm(total=total_steps, disable=not self._is_rank_zero, desc="training")
        for curr_epoch in range(self.total_epochs):
            self._sampler.set_epoch(curr_epoch)
            for idx, batch in enumerate(self._dataloader):
                utils.batch_to_device(batch, self._device)
                current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
                num_tokens += current_num_tokens
                labels = batch.pop("labels")
                logits = self._model(**batch)
                labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))
                # Summed over tokens here, divided by the tokens of all ranks and micro-batches at the step.
                current_loss = self._loss_fn(logits, labels) * current_num_tokens
                del logits
                running_loss += current_loss
                current_loss.backward()

                if (idx + 1) % self._gradient_accumulation_steps == 0:
                    dist.all_reduce(num_tokens)
                    dist.all_reduce(running_loss)
                    # FSDP2 averages gradients over ranks; undo that and divide by the token count.
                    training.scale_grads(self._model, self.world_size / num_tokens)
                    grad_norm = None
                    if self._clip_grad_norm is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            self._model.parameters(), max_norm=float(self._clip_grad_norm)
                        )
                        if isinstance(grad_norm, DTensor):  # sharded: the norm over all ranks
                            grad_norm = grad_norm.full_tensor()
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    self._lr_scheduler.step()
                    self.global_step += 1

                    loss = running_loss.item() / num_tokens.item()
                    step_time = time.perf_counter() - t0
                    metrics = {
                        "loss": loss,
                        "lr": get_lr(self._optimizer),
                        "tokens_per_second_per_gpu": num_tokens.item() / (step_time * self.world_size),
                    }
                    if grad_norm is not None:
                        metrics["grad_norm"] = grad_norm.item()
                    pbar.update(1)
                    pbar.set_postfix(
                        epoch=curr_epoch + 1,
                        loss=f"{loss:.4f}",
                        lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_second_per_gpu']:.0f}",
                    )
                    if self._is_rank_zero and self.global_step % self._log_every_n_steps == 0:
                        self._metric_logger.log_dict(metrics, step=self.global_step)
                    running_loss, num_tokens = 0, 0
                    t0 = time.perf_counter()

                if (idx + 1) // self._gradient_accumulation_steps == self._steps_per_epoch:
                    break
        pbar.close()

    def save_checkpoint(self, name: str = "checkpoint_final") -> None:
        """Gather the sharded weights on rank 0 and write them as the HF directory `output_dir/name`."""
        state_dict = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._is_rank_zero:
            path = self._checkpointer.save_checkpoint({training.MODEL_KEY: state_dict}, name=name)
            log.info(f"HF checkpoint written to {path}")
        dist.barrier()

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    validate_config(cfg, CONFIG_KEYS)
    config.log_config(recipe_name="RefFinetuneRecipe", cfg=cfg)
    recipe = RefFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.save_checkpoint("checkpoint_final")
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
