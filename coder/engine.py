"""The training loop (CODER §4.2; resume as the README describes): one readable file.

`Trainer(cfg, output_dir).fit()` trains, validates on dev every epoch, keeps the best model by dev R@sum
(fused score), writes atomic checkpoints, resumes exactly (`resume="auto"`), and finally evaluates the
best model on the test split into `eval_<split>.json`.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    config_differences,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .clustering import pair_features, spherical_kmeans
from .config import ConfigError, dump, from_dict
from .data import PrecompDataset, collate
from .data.precomp import require_split
from .errors import CoderError
from .evaluation import evaluate_split, format_table, write_json
from .losses.objective import Bank, Objective
from .models.model import build_model
from .models.text import load_text_backbone
from .runlog import RunLog, progress_bars


class NonFiniteLossError(CoderError, RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


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
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_at(train_cfg: dict, epoch: int) -> float:
    """Step schedule (§4.2): lr x lr_decay at each epoch listed in train.lr_decay_epochs."""
    return train_cfg["lr"] * train_cfg["lr_decay"] ** sum(epoch >= e for e in train_cfg["lr_decay_epochs"])


def build_optimizer(module: nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    """Adam/AdamW; BERT parameters (query encoder) train at text_lr_mult x lr (§4.2)."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    text = [p for n, p in params if ".backbone.bert." in f".{n}"]
    rest = [p for n, p in params if ".backbone.bert." not in f".{n}"]
    groups = [{"params": rest, "lr_mult": 1.0}, {"params": text, "lr_mult": train_cfg["text_lr_mult"]}]
    cls = torch.optim.AdamW if train_cfg["optimizer"] == "adamw" else torch.optim.Adam
    # one fused kernel per step instead of a chain of foreach ops: the same update up to float rounding,
    # 5x faster on the CPU (0.64 -> 0.13 s for BERT-base, benchmarks/RESULTS.md)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in params)
    return cls(groups, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], fused=fused)


def clip_groups(model: nn.Module, objective: nn.Module, scope: str) -> dict[str, list[nn.Parameter]]:
    """The parameter sets whose gradient norms are clipped apart: one set ("all"), or ("branch") the concept
    branch (model.concept, the PGC classifier) apart from the rest, so that L_DCL^C and L_PGC, whose
    gradients can be several times the instance terms', do not set the factor on the instance gradients."""
    params = [p for module in (model, objective) for p in module.parameters() if p.requires_grad]
    concept = {id(p) for module in (model.concept, objective.prototypes) if module is not None
               for p in module.parameters()}
    if scope == "all" or not concept:
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


class TrainStep(nn.Module):
    """Model + objective as one module, so DistributedDataParallel syncs the PGC classifier too.

    With `gather_batch` under DDP the objective sees every rank's embeddings (gathered with gradients), so
    N processes of batch B train like one process of batch N x B; the returned `out` stays this rank's own
    (the banks gather keys themselves when they enqueue)."""

    def __init__(self, model: nn.Module, objective: Objective, gather_batch: bool = False):
        super().__init__()
        self.model, self.objective, self.gather_batch = model, objective, gather_batch

    def forward(self, batch: dict, epoch: int, labels: torch.Tensor | None):
        out = self.model(batch["regions"], batch["region_lengths"], batch["input_ids"], batch["text_lengths"],
                         batch.get("clip"))
        bank = Bank(*self.model.momentum.bank()) if self.model.momentum is not None else None
        seen_out, seen_batch, seen_labels = out, batch, labels
        if self.gather_batch and dist.is_distributed():
            seen_out = {name: dist.gather_with_grad(value) for name, value in out.items()}
            seen_batch = {key: dist.gather_with_grad(batch[key]) for key in ("index", "image_index")}
            seen_labels = dist.gather_with_grad(labels) if labels is not None else None
        loss, terms, diag = self.objective(seen_out, seen_batch, epoch, bank, seen_labels)
        return loss, terms, diag, out


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
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(tcfg["seed"], tcfg["deterministic"])
        dist.barrier()  # rank 0 may still be preparing the data (the demo generates it on first use)
        require_split(cfg["data"]["root"], cfg["data"]["train_split"])  # the data before what is derived from it

        bert, self.tokenizer = load_text_backbone(cfg["model"]["text_encoder"], cfg["model"]["text_layers"])
        self.model = build_model(cfg, bert).to(self.device)
        self.objective = Objective(cfg).to(self.device)
        self.step_module: nn.Module = TrainStep(self.model, self.objective, tcfg["gather_batch"])
        if self.world > 1 and self.device.type == "cuda" and tcfg["sync_batchnorm"]:
            self.step_module = nn.SyncBatchNorm.convert_sync_batchnorm(self.step_module)
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.objective.prototypes is not None)
        self.optimizer = build_optimizer(self.step_module, tcfg)
        self._build_data()

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_rsum, self.best_epoch = -1.0, -1
        self.best_beta = self.val_beta = cfg["eval"]["beta"]  # the fusion weight (§3.5) of the best model
        self.centroids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.writer = None
        self.runlog = RunLog(self.out_dir, enabled=dist.is_main())
        if resume:
            self._resume(resume)
        if dist.is_main():  # after the resume check: a refused resume leaves the run folder as it was
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump(cfg))
            # purge from the first step not in the checkpoint (steps are logged after their increment, so step
            # global_step is in it): what a killed run logged after its last checkpoint is dropped, not shown twice
            purge = self.global_step + 1 if self.global_step else None
            self.writer = SummaryWriter(str(self.out_dir), purge_step=purge)
            if self.global_step == 0:
                self.writer.add_text("config", "```yaml\n" + dump(cfg) + "```", 0)  # the resolved hyper-parameters

    # ------------------------------------------------------------------------------------ building
    def _build_data(self) -> None:
        cfg, data = self.cfg, self.cfg["data"]
        aug = data["augment"]
        self.train_set = PrecompDataset(
            data["root"], data["train_split"], self.tokenizer, max_words=data["max_words"], train=aug,
            region_dropout=data["region_dropout"] if aug else 0.0,
            word_corruption=data["word_corruption"] if aug else 0.0,
            captions_per_image=data["captions_per_image"], load_clip=data["clip_features"],
            clip_dim=cfg["model"]["user"]["clip_dim"], seed=cfg["train"]["seed"])
        if self.train_set.region_dim != cfg["model"]["region_dim"]:
            raise ConfigError(f"config key 'model.region_dim' is {cfg['model']['region_dim']} but "
                             f"{data['root']}/{data['train_split']}_ims.npy has {self.train_set.region_dim}-d regions")
        batch = cfg["train"]["batch_size"]
        if len(self.train_set) < batch * self.world:
            raise ConfigError(f"config key 'train.batch_size' ({batch}) x {self.world} process(es) exceeds the "
                             f"{len(self.train_set)} training captions in {data['root']}")
        base = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                  seed=cfg["train"]["seed"], drop_last=True)
        self.sampler = ResumeSampler(base, batch)
        cuda = self.device.type == "cuda"
        # Its own generator: starting an epoch's iterator must not draw from the global RNG, or a run resumed
        # mid-epoch (which starts one more iterator after restoring that RNG) would drift from an uninterrupted one.
        self.loader_generator = torch.Generator()
        self.train_loader = DataLoader(self.train_set, batch_size=batch, sampler=self.sampler, drop_last=True,
                                       collate_fn=collate, num_workers=data["num_workers"], pin_memory=cuda,
                                       persistent_workers=False, generator=self.loader_generator)

    def steps_per_epoch(self) -> int:
        full = len(self.train_set) // (self.cfg["train"]["batch_size"] * self.world)
        cap = self.cfg["train"]["max_steps_per_epoch"]
        return min(full, cap) if cap > 0 else full

    # ------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": "coder", "version": FORMAT_VERSION, "config": self.cfg,
            "model": self.model.state_dict(), "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_rsum": self.best_rsum, "best_epoch": self.best_epoch,
            "best_beta": self.best_beta, "rng": rng_state(),
            "kmeans": {"centroids": self.centroids, "labels": self.labels},
        }

    def save_last(self) -> None:
        if dist.is_main():
            atomic_save(self._state(), self.out_dir / "checkpoint_last.pth")

    def save_best(self) -> None:
        if dist.is_main():
            state = {"format": "coder", "version": FORMAT_VERSION, "config": self.cfg,
                     "model": self.model.state_dict(), "objective": self.objective.state_dict(),
                     "epoch": self.epoch, "best_rsum": self.best_rsum, "beta": self.best_beta}
            atomic_save(state, self.out_dir / "model_best.pth")

    def _resume(self, resume: str) -> None:
        path = self.out_dir / "checkpoint_last.pth" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():
            if dist.is_main():
                print(f"--resume auto: no {path} yet, starting a fresh run")
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        diffs = config_differences(from_dict(ckpt["config"]), self.cfg)
        if diffs:
            raise CheckpointError(f"checkpoint {path} was trained with a different config; keys that differ: "
                                  + "; ".join(diffs))
        self.model.load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.best_rsum, self.best_epoch = ckpt["best_rsum"], ckpt["best_epoch"]
        self.best_beta = ckpt.get("best_beta", self.best_beta)
        self.centroids, self.labels = ckpt["kmeans"]["centroids"], ckpt["kmeans"]["labels"]
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in ckpt["rng"].items()})
        if dist.is_main():
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch} of the epoch")

    # ------------------------------------------------------------------------------------ k-means (§3.4)
    def pgc_active(self, epoch: int) -> bool:
        return self.objective.prototypes is not None and epoch >= self.cfg["cluster"]["start_epoch"]

    def update_clusters(self, epoch: int) -> None:
        """Online k-means (§3.4): every rank encodes a contiguous share of the training pairs, the features are
        gathered in dataset order, rank 0 clusters them and broadcasts; labels are read by dataset index."""
        ccfg, data = self.cfg["cluster"], self.cfg["data"]
        plain = PrecompDataset(data["root"], data["train_split"], self.tokenizer, max_words=data["max_words"],
                               train=False, captions_per_image=data["captions_per_image"],
                               load_clip=data["clip_features"], clip_dim=self.cfg["model"]["user"]["clip_dim"])
        bounds = [len(plain) * r // self.world for r in range(self.world + 1)]
        share = Subset(plain, range(bounds[self.rank], bounds[self.rank + 1]))
        loader = DataLoader(share, batch_size=self.cfg["eval"]["batch_size"], collate_fn=collate,
                            num_workers=data["num_workers"])
        self.model.eval()
        (x,) = dist.all_gather_rows(pair_features(self.model.momentum.encode_pairs, loader, self.device,
                                                  self._autocast(), self.progress and dist.is_main()))
        labels = torch.zeros(len(self.train_set), dtype=torch.long, device=self.device)
        centroids = torch.zeros(ccfg["k"], self.cfg["model"]["embed_dim"], device=self.device)
        if dist.is_main():
            result = spherical_kmeans(x, min(ccfg["k"], x.size(0)), iters=ccfg["iters"],
                                      init=self.centroids.to(self.device) if self.centroids is not None else None,
                                      chunk_size=ccfg["chunk_size"], seed=self.cfg["train"]["seed"] + epoch,
                                      progress=self.progress)
            labels.copy_(result.labels)
            centroids[: result.centroids.size(0)].copy_(result.centroids)
            self._log_clusters(result, epoch)
        self.labels, self.centroids = dist.broadcast(labels), dist.broadcast(centroids)

    def _log_clusters(self, result, epoch: int) -> None:
        if self.writer is not None:
            sizes = torch.bincount(result.labels, minlength=result.centroids.size(0)).float()
            self.writer.add_scalar("kmeans/inertia", float(result.inertia[-1]), epoch)
            self.writer.add_scalar("kmeans/cluster_size_std", float(sizes.std()), epoch)
            self.writer.add_scalar("kmeans/empty_clusters", float((sizes == 0).sum()), epoch)

    # ------------------------------------------------------------------------------------ training
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.cfg["train"]["amp"]
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

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
        labels = self.labels if self.pgc_active(epoch) else None
        groups = clip_groups(self.model, self.objective, tcfg["grad_clip_scope"])
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        diversities = []
        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=not (self.progress and dist.is_main()))
        tic, seen = time.perf_counter(), 0
        for batch in self.train_loader:
            if self.step_in_epoch >= total:
                break
            batch = self._to_device(batch)
            with self._autocast():
                loss, terms, diag, out = self.step_module(
                    batch, epoch, labels[batch["index"]] if labels is not None else None)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms = {name: nn.utils.clip_grad_norm_(group, tcfg["grad_clip"])
                          for name, group in groups.items() if group} if tcfg["grad_clip"] > 0 else {}
            bad |= ~torch.isfinite(loss)  # checked without a per-step sync, before anything is saved
            self.optimizer.step()
            if self.model.momentum is not None:
                self.model.momentum.enqueue(out["v_key"].float(), out["w_key"].float(), batch["image_index"])
            if "diversity_v" in diag:
                diversities.append(torch.cat([diag["diversity_v"], diag["diversity_w"]]))
            self.step_in_epoch += 1
            self.global_step += 1
            seen += batch["input_ids"].size(0) * self.world
            bar.update(1)
            if self.global_step % tcfg["log_every"] == 0 or self.step_in_epoch == total:
                self._check_finite(bad, epoch)
                rate = seen / (time.perf_counter() - tic)
                # every rank joins the averages (a collective), so the logged losses are the whole batch's
                loss_avg = dist.all_reduce_mean(loss.detach())
                terms_avg = {name: dist.all_reduce_mean(value.detach()) for name, value in terms.items()}
                self._log_step(loss_avg, terms_avg, diag, grad_norms, lr, rate)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if tcfg["save_every"] > 0 and self.global_step % tcfg["save_every"] == 0:
                self._check_finite(bad, epoch)
                self.save_last()
        bar.close()
        self._check_finite(bad, epoch)
        if diversities and self.writer is not None:
            self.writer.add_histogram("diversity/epoch", torch.cat(diversities).float().cpu(), epoch)

    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        if bool(bad):
            raise NonFiniteLossError(
                f"non-finite loss in epoch {epoch} near step {self.step_in_epoch}; stopped without saving. "
                f"The last good checkpoint is {self.out_dir / 'checkpoint_last.pth'} (resume with --resume auto, "
                f"perhaps with a lower train.lr)")

    def _log_step(self, loss, terms, diag, grad_norms, lr, rate) -> None:
        if self.writer is None:
            return
        step, w = self.global_step, self.writer
        self.runlog.add(loss, terms)
        w.add_scalar("loss/total", loss.item(), step)
        for name, value in terms.items():
            w.add_scalar(f"loss/{name}", value.item(), step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/lr_text", lr * self.cfg["train"]["text_lr_mult"], step)  # the BERT group
        w.add_scalar("train/samples_per_s", rate, step)
        for name, norm in grad_norms.items():  # before clipping
            w.add_scalar("train/grad_norm" if name == "all" else f"train/grad_norm_{name}", norm.item(), step)
        for name in ("diversity_v", "diversity_w"):
            if name in diag:
                d = diag[name].float()
                w.add_scalar(f"diversity/{name}_mean", d.mean().item(), step)
                w.add_scalar(f"diversity/{name}_min", d.min().item(), step)
                w.add_scalar(f"diversity/{name}_max", d.max().item(), step)
        if self.model.momentum is not None:
            w.add_scalar("queue/fill", self.model.momentum.queue_v.fill_fraction(), step)

    # ------------------------------------------------------------------------------------ evaluation
    def validate(self, epoch: int) -> float:
        """Dev R@sum of the fused score (model selection, §4.2); computed on rank 0 and broadcast."""
        score = torch.zeros((), dtype=torch.float64, device=self.device)
        if dist.is_main():
            result = evaluate_split(self.model, self.cfg, self.tokenizer, self.cfg["data"]["val_split"],
                                    self.device, progress=self.progress, branches=False, select_beta=True)
            score.fill_(result["rsum"])
            self.val_beta = result["beta"]
            self.writer.add_scalar("dev/beta", result["beta"], epoch)
            for d in ("i2t", "t2i"):
                for m in ("r1", "r5", "r10"):
                    self.writer.add_scalar(f"dev/{d}_{m}", result[d][m], epoch)
            self.writer.add_scalar("dev/rsum", result["rsum"], epoch)
        return float(dist.broadcast(score))

    def fit(self) -> dict | None:
        try:
            return self._fit()
        finally:
            if self.writer is not None:
                self.writer.close()  # flush TensorBoard events even when training stops on an error

    def _fit(self) -> dict | None:
        epochs = self.cfg["train"]["epochs"]
        bar = tqdm(range(self.epoch, epochs), desc="epochs", disable=not (self.progress and dist.is_main()))
        for epoch in bar:
            self.epoch = epoch
            if self.pgc_active(epoch) and (self.labels is None or self.step_in_epoch == 0):
                self.update_clusters(epoch)
            self.train_epoch(epoch)
            rsum = self.validate(epoch) if (epoch + 1) % self.cfg["train"]["eval_every"] == 0 or \
                epoch + 1 == epochs else -1.0
            if rsum > self.best_rsum:
                self.best_rsum, self.best_epoch, self.best_beta = rsum, epoch, self.val_beta
                self.save_best()
            bar.set_postfix(dev_rsum=f"{rsum:.1f}", best=f"{self.best_rsum:.1f}")
            self.runlog.epoch(epoch, epochs, rsum, self.best_rsum, self.best_epoch)
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.save_last()
            dist.barrier()
        bar.close()
        result = self.test() if dist.is_main() else None
        if dist.is_main() and not self.cfg["train"]["keep_last_checkpoint"]:
            (self.out_dir / "checkpoint_last.pth").unlink(missing_ok=True)  # finished: model_best.pth holds the result
        dist.barrier()
        return result

    def test(self) -> dict:
        """Evaluate model_best on the test split with the dataset's protocol; write eval_<split>.json."""
        best = load_checkpoint(self.out_dir / "model_best.pth", map_location=self.device)
        self.model.load_state_dict(best["model"])
        split = self.cfg["data"]["test_split"]
        result = evaluate_split(self.model, self.cfg, self.tokenizer, split, self.device, self.progress,
                                beta=best.get("beta"))
        result["best_epoch"], result["best_dev_rsum"] = self.best_epoch, self.best_rsum
        write_json(self.out_dir / f"eval_{split}.json", result)
        if self.writer is not None:
            for d in ("i2t", "t2i"):
                for m in ("r1", "r5", "r10"):
                    self.writer.add_scalar(f"test/{d}_{m}", result[d][m], self.best_epoch)
            self.writer.add_scalar("test/rsum", result["rsum"], self.best_epoch)
        print(f"\n{self.cfg['name']}: {split} ({self.cfg['data']['dataset']}), best epoch {self.best_epoch}\n"
              + format_table(result))
        return result
