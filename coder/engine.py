"""The training loop (CODER §4.2; resume as docs/training.md describes): one readable file.

`Trainer(cfg, output_dir).fit()` trains, validates on dev every epoch, keeps the best model by dev R@sum
(fused score), writes atomic checkpoints, resumes exactly (`resume="auto"`), and finally evaluates the
best model on the test split into `eval_<split>.json`. What one step computes lives in coder/step.py.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from . import distributed as dist
from .batchnorm import global_batchnorm_within
from .checkpoint import (
    PROGRESS_KEYS,
    atomic_save,
    best_model_state,
    load_checkpoint,
    restore_training,
    rng_state,
    training_state,
)
from .clustering import cluster_training_pairs
from .config import ConfigError, dump
from .data import PrecompDataset, collate
from .data.checks import check_against_data
from .data.precomp import require_split
from .data.workers import loader_options
from .errors import NonFiniteLossError
from .evaluation import evaluate_split, format_table, write_json
from .logger import TrainLogger
from .models.bigru import load_text
from .models.heads import ImageHead
from .models.model import ImageEncoder, build_model
from .precision import set_deterministic, tf32
from .runlog import RunClock, progress_bars
from .step import ContrastiveStep, build_step, compile_step
from .vocab import WordVocabulary


# -------------------------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        set_deterministic()


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp`: auto = bf16 where the GPU has it natively (compute capability 8+),
    fp16 on older GPUs (their bf16 is emulated, slower than fp32), none on the CPU; None = float32."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        mode = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def lr_at(train_cfg: dict, epoch: int) -> float:
    """Step schedule (§4.2): lr x lr_decay at each epoch listed in train.lr_decay_epochs."""
    return train_cfg["lr"] * train_cfg["lr_decay"] ** sum(epoch >= e for e in train_cfg["lr_decay_epochs"])


def build_optimizer(module: nn.Module, train_cfg: dict, text_backbone: nn.Module) -> torch.optim.Optimizer:
    """Adam/AdamW; the text backbone's parameters (BERT) train at text_lr_mult x lr (VSE-infinity's recipe)."""
    params = [p for p in module.parameters() if p.requires_grad]
    text_ids = {id(p) for p in text_backbone.parameters()}
    rest, text = [p for p in params if id(p) not in text_ids], [p for p in params if id(p) in text_ids]
    groups = [{"params": rest, "lr_mult": 1.0}, {"params": text, "lr_mult": train_cfg["text_lr_mult"]}]
    cls = torch.optim.AdamW if train_cfg["optimizer"] == "adamw" else torch.optim.Adam
    # one fused kernel per step instead of a chain of foreach ops: the same update up to float rounding,
    # 5x faster on the CPU (0.64 -> 0.13 s for BERT-base, benchmarks/RESULTS.md)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return cls(groups, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], fused=fused)


def clip_groups(model: nn.Module, objective: nn.Module, scope: str) -> dict[str, list[nn.Parameter]]:
    """The parameter sets whose gradient norms are clipped apart: one set ("all"), or ("branch") the concept
    branch (model.concept, the PGC classifier) apart from the rest, so that L_DCL^C and L_PGC, whose
    gradients can be several times the instance terms', do not set the factor on the instance gradients.
    With undetached concept queries those losses reach the encoders too (BERT's states, or v^I and w^I):
    no parameter split separates them, and one norm is used."""
    params = [p for module in (model, objective) for p in module.parameters() if p.requires_grad]
    concept = {id(p) for module in (model.concept, objective.prototypes) if module is not None
               for p in module.parameters()}
    if scope == "all" or not concept or not model.concept.detach_query:
        return {"all": params}
    return {"instance": [p for p in params if id(p) not in concept],
            "concept": [p for p in params if id(p) in concept]}


class ResumeSampler(Sampler):
    """A DistributedSampler whose epoch can start after the batches a killed run already trained on."""

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        self.sampler, self.batch_size, self.skip_batches = sampler, batch_size, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self):
        return iter(list(self.sampler)[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return len(self.sampler) - self.skip_batches * self.batch_size


def training_split(cfg: dict, tokenizer, train: bool) -> PrecompDataset:
    """The training split, augmented (VSE-infinity's region dropout and word corruption) or plain."""
    data = cfg["data"]
    return PrecompDataset(
        data["root"], data["train_split"], tokenizer, max_words=data["max_words"], train=train,
        region_dropout=data["region_dropout"] if train else 0.0,
        word_corruption=data["word_corruption"] if train else 0.0,
        captions_per_image=data["captions_per_image"], load_clip=data["clip_features"],
        clip_dim=cfg["model"]["user"]["clip_dim"], seed=cfg["train"]["seed"])


def training_data(cfg: dict, tokenizer, world: int, rank: int, device_type: str):
    """(dataset, sampler, loader, the loader's generator) of the training split for this process."""
    data, batch = cfg["data"], cfg["train"]["batch_size"]
    dataset = training_split(cfg, tokenizer, train=data["augment"])
    check_against_data(cfg, dataset, world)  # region shapes, batch, bank and prototypes against the data
    sampler = ResumeSampler(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                               seed=cfg["train"]["seed"], drop_last=True), batch)
    # Its own generator: starting an epoch's iterator must not draw from the global RNG, or a run resumed
    # mid-epoch (which starts one more iterator after restoring that RNG) would drift from an uninterrupted one.
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=collate,
                        generator=generator, **loader_options(data["num_workers"], device_type))
    return dataset, sampler, loader, generator


def optimizer_step(loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler, groups: dict, clip: float) -> dict:
    """Backward (loss-scaled under fp16), per-group gradient clipping, the optimizer step; returns the
    gradient norms before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients
    norms = {name: nn.utils.clip_grad_norm_(group, clip) for name, group in groups.items() if group} \
        if clip > 0 else {}
    scaler.step(optimizer)
    scaler.update()
    return norms


def data_parallel(step: ContrastiveStep, device: torch.device, world: int, sync_batchnorm: bool) -> nn.Module:
    """The step as DistributedDataParallel over `world` processes (itself in one process)."""
    if world == 1:
        return step
    if device.type == "cuda" and sync_batchnorm:  # the image side's BatchNorm over the global batch, sync-free
        step = global_batchnorm_within(step, (ImageEncoder, ImageHead))
    return dist.wrap_ddp(step, device, find_unused=step.objective.prototypes is not None)


def evaluate_best_model(model, cfg: dict, tokenizer, out_dir: Path, device, progress: bool, log: TrainLogger,
                    best_epoch: int, best_rsum: float) -> dict:
    """model_best.pth on the test split (its dev-chosen beta), written to eval_<split>.json with the epoch and
    dev R@sum it was chosen by, logged and printed."""
    best = load_checkpoint(out_dir / "model_best.pth", map_location=device)
    model.load_state_dict(best["model"])
    split = cfg["data"]["test_split"]
    result = evaluate_split(model, cfg, tokenizer, split, device, progress, beta=best.get("beta"))
    result["best_epoch"], result["best_dev_rsum"] = best_epoch, best_rsum
    write_json(out_dir / f"eval_{split}.json", result)
    log.recalls("test", result, best_epoch)
    print(f"\n{cfg['name']}: {split} ({cfg['data']['dataset']}), best epoch {best_epoch}\n" + format_table(result))
    return result


def check_finite(bad: torch.Tensor, epoch: int, step_in_epoch: int, out_dir: Path) -> None:
    """Stop every rank on a non-finite loss of any rank (the others would wait at a collective), before a save."""
    if bool(dist.any_rank(bad)):
        raise NonFiniteLossError(
            f"non-finite loss in epoch {epoch} near step {step_in_epoch}; stopped without saving. "
            f"The last good checkpoint is {out_dir / 'checkpoint_last.pth'} (resume with --resume auto, "
            f"perhaps with a lower train.lr)")


def write_run_files(out_dir: Path, cfg: dict, tokenizer) -> None:
    """config.yaml, and the BiGRU's word vocabulary as vocab.json (its checkpoints hold it too)."""
    (out_dir / "config.yaml").write_text(dump(cfg))
    if isinstance(tokenizer, WordVocabulary):
        tokenizer.save(out_dir / "vocab.json")


# -------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: dict, output_dir: str | Path, resume: str | None = None, progress: bool = True):
        self.cfg, self.out_dir, self.progress = cfg, Path(output_dir), progress_bars(progress)
        tcfg = cfg["train"]
        self.device = resolve_device(tcfg["device"])
        self.rank, self.world, local_rank = dist.init_distributed(self.device.type, tcfg["dist_timeout_minutes"])
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        seed_everything(tcfg["seed"], tcfg["deterministic"])
        dist.barrier()  # rank 0 may still be preparing the data (the demo generates it on first use)
        require_split(cfg["data"]["root"], cfg["data"]["train_split"])  # the data before what is derived from it

        bert, self.tokenizer = load_text(cfg, log=print if dist.is_main() else lambda _: None)
        self.model = build_model(cfg, bert)
        self.step = build_step(cfg, self.model).to(self.device)  # + momentum encoders, banks and Eq. 8's terms
        self.objective = self.step.objective
        dist.offset_seeds(tcfg["seed"], self.rank)  # parameters identical on every rank, dropout streams not
        self.step_module = data_parallel(self.step, self.device, self.world, tcfg["sync_batchnorm"])
        compile_step(self.step, tcfg["compile"])  # in place, after DDP's BatchNorm conversion: same state dict
        self.optimizer = build_optimizer(self.step_module, tcfg, self.model.text_encoder.backbone)
        self.amp = amp_dtype(tcfg["amp"], self.device)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.train_set, self.sampler, self.train_loader, self.loader_generator = training_data(
            cfg, self.tokenizer, self.world, self.rank, self.device.type)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_rsum, self.best_epoch = -1.0, -1
        self.best_beta = self.val_beta = cfg["eval"]["beta"]  # the fusion weight (§3.5) of the best model
        self.centroids = self.labels = None  # k-means state (§3.4): prototypes and the pairs' labels
        self.clock = RunClock()  # the training's wall time, which a resume continues
        if resume:
            self._resume(resume)
        self.log = TrainLogger(None)
        if dist.is_main():  # after the resume check: a refused resume leaves the run folder as it was
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_run_files(self.out_dir, cfg, self.tokenizer)
            # purge from the first step not in the checkpoint (steps are logged after their increment, so step
            # global_step is in it): what a killed run logged after its last checkpoint is dropped, not shown twice
            self.log = TrainLogger(self.out_dir, purge_step=self.global_step + 1 if self.global_step else None,
                                   config_text=dump(cfg) if self.global_step == 0 else None)

    def steps_per_epoch(self) -> int:
        full = len(self.train_set) // (self.cfg["train"]["batch_size"] * self.world)
        cap = self.cfg["train"]["max_steps_per_epoch"]
        return min(full, cap) if cap > 0 else full

    # ------------------------------------------------------------------------------------ checkpoints
    def save_last(self) -> None:
        rng = rng_state()  # every rank's generators: a collective, so every rank calls save_last
        if dist.is_main():
            progress = {**{key: getattr(self, key) for key in PROGRESS_KEYS}, "train_seconds": self.clock.seconds()}
            atomic_save(training_state(self.cfg, self.step, self.optimizer, self.scaler, progress,
                                       {"centroids": self.centroids, "labels": self.labels}, rng),
                        self.out_dir / "checkpoint_last.pth")

    def save_best(self) -> None:
        if dist.is_main():
            atomic_save(best_model_state(self.cfg, self.model, self.objective, self.epoch, self.best_rsum,
                                         self.best_beta), self.out_dir / "model_best.pth")

    def _resume(self, resume: str) -> None:
        path = self.out_dir / "checkpoint_last.pth" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            if dist.is_main():
                print(f"--resume auto: no {path} yet, starting a fresh run")
            return
        state = restore_training(path, self.cfg, self.step, self.optimizer, self.scaler, self.device)
        for key in PROGRESS_KEYS:  # epoch, step_in_epoch, global_step, best_rsum, best_epoch, best_beta
            setattr(self, key, state.get(key, getattr(self, key)))
        self.centroids, self.labels = state["kmeans"]["centroids"], state["kmeans"]["labels"]
        self.clock = RunClock(before=state["train_seconds"])
        if dist.is_main():
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch} of the epoch")

    # ------------------------------------------------------------------------------------ training
    def update_clusters(self, epoch: int) -> None:
        """Online k-means (§3.4) on the momentum encoders' pair features; labels are read by dataset index."""
        ccfg, init = self.cfg["cluster"], self.centroids.to(self.device) if self.centroids is not None else None
        self.step.eval()
        self.labels, self.centroids, result = cluster_training_pairs(
            self.step.momentum.encode_pairs, training_split(self.cfg, self.tokenizer, train=False), k=ccfg["k"],
            iters=ccfg["iters"], init=init, chunk_size=ccfg["chunk_size"], seed=self.cfg["train"]["seed"] + epoch,
            batch_size=self.cfg["eval"]["batch_size"], num_workers=self.cfg["data"]["num_workers"],
            device=self.device, autocast=self._autocast(), world=self.world, rank=self.rank, progress=self.progress)
        self.log.clusters(result, epoch)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def train_epoch(self, epoch: int) -> None:
        tcfg = self.cfg["train"]
        lr = lr_at(tcfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.step_module.train()
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, self.step_in_epoch)
        self.loader_generator.manual_seed(tcfg["seed"] + epoch)  # worker seeds: a function of (seed, epoch)
        total = self.steps_per_epoch()
        labels = self.labels if self.objective.needs_labels(epoch) else None
        groups = clip_groups(self.model, self.objective, tcfg["grad_clip_scope"])
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        diversities = []
        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=not (self.progress and dist.is_main()))
        tic, seen = time.perf_counter(), 0
        for batch in self.train_loader:
            if self.step_in_epoch >= total:
                break
            batch = {k: v.to(self.device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
            with self._autocast():
                loss, terms, diag = self.step_module(batch, epoch, labels[batch["index"]] if labels is not None
                                                     else None)
            grad_norms = optimizer_step(loss, self.optimizer, self.scaler, groups, tcfg["grad_clip"])
            bad |= ~torch.isfinite(loss)  # checked without a per-step sync, before anything is saved
            if "diversity_v" in diag:
                diversities.append(torch.cat([diag["diversity_v"], diag["diversity_w"]]))
            self.step_in_epoch += 1
            self.global_step += 1
            seen += batch["input_ids"].size(0) * self.world
            bar.update(1)
            if self.global_step % tcfg["log_every"] == 0 or self.step_in_epoch == total:
                check_finite(bad, epoch, self.step_in_epoch, self.out_dir)
                self._log_step(loss, terms, diag, grad_norms, lr, seen / (time.perf_counter() - tic))
                if not bar.disable:  # a hidden bar's loss would be one more wait for the device
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if tcfg["save_every"] > 0 and self.global_step % tcfg["save_every"] == 0:
                check_finite(bad, epoch, self.step_in_epoch, self.out_dir)
                self.save_last()
        bar.close()
        check_finite(bad, epoch, self.step_in_epoch, self.out_dir)
        self.log.diversity_histogram(diversities, epoch)

    def _log_step(self, loss, terms, diag, grad_norms, lr, rate) -> None:
        # every rank joins the averages (a collective), so the logged losses are the whole batch's
        loss = dist.all_reduce_mean(loss.detach())
        terms = {name: dist.all_reduce_mean(value.detach()) for name, value in terms.items()}
        self.log.step(self.global_step, loss, terms, diag, grad_norms, lr, lr * self.cfg["train"]["text_lr_mult"],
                      rate, self.step.queue_fill())

    # ------------------------------------------------------------------------------------ evaluation
    def validate(self, epoch: int) -> float:
        """Dev R@sum of the fused score (model selection by dev R@sum, as VSE-infinity's and CODER's code);
        computed on rank 0 and broadcast."""
        score = torch.zeros((), dtype=torch.float64, device=self.device)
        if dist.is_main():
            result = evaluate_split(self.model, self.cfg, self.tokenizer, self.cfg["data"]["val_split"],
                                    self.device, progress=self.progress, branches=False, select_beta=True)
            score.fill_(result["rsum"])
            self.val_beta = result["beta"]
            self.log.scalar("dev/beta", result["beta"], epoch)
            self.log.recalls("dev", result, epoch)
        return float(dist.broadcast(score))

    def fit(self) -> dict | None:
        try:
            return self._fit()
        finally:
            self.log.close()  # flush TensorBoard events even when training stops on an error

    def _fit(self) -> dict | None:
        epochs = self.cfg["train"]["epochs"]
        bar = tqdm(range(self.epoch, epochs), desc="epochs", disable=not (self.progress and dist.is_main()))
        for epoch in bar:
            self.epoch = epoch
            if self.objective.needs_labels(epoch) and (self.labels is None or self.step_in_epoch == 0):
                with tf32(False):  # assignments among near ties in IEEE float32, never TF32
                    self.update_clusters(epoch)
            with tf32(self.cfg["train"]["tf32"]):
                self.train_epoch(epoch)
            with tf32(False):  # ranking as evaluate.py ranks
                due = (epoch + 1) % self.cfg["train"]["eval_every"] == 0 or epoch + 1 == epochs
                rsum = self.validate(epoch) if due else -1.0
            if rsum > self.best_rsum:
                self.best_rsum, self.best_epoch, self.best_beta = rsum, epoch, self.val_beta
                self.save_best()
            bar.set_postfix(dev_rsum=f"{rsum:.1f}", best=f"{self.best_rsum:.1f}")
            self.log.epoch_end(epoch, epochs, rsum, self.best_rsum, self.best_epoch, self.clock.seconds())
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.save_last()
            dist.barrier()
        bar.close()
        with tf32(False):
            result = self.test() if dist.is_main() else None
        if dist.is_main() and not self.cfg["train"]["keep_last_checkpoint"]:
            (self.out_dir / "checkpoint_last.pth").unlink(missing_ok=True)  # finished: model_best.pth holds the result
        dist.barrier()
        return result

    def test(self) -> dict:
        """Evaluate model_best on the test split with the dataset's protocol; write eval_<split>.json."""
        return evaluate_best_model(self.model, self.cfg, self.tokenizer, self.out_dir, self.device, self.progress,
                               self.log, self.best_epoch, self.best_rsum)
