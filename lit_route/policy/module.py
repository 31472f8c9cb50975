"""``RLOOPolicyModule``: online RLHF with RLOO advantages from routed pairwise scores (manual optimisation)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from lit_route.models.backbone import (
    BackboneSpec,
    LoraSpec,
    apply_lora,
    load_backbone,
    load_tokenizer,
)
from lit_route.models.split import Trunk
from lit_route.policy.checkpoint import PolicyCheckpointing
from lit_route.policy.context import RewardContext
from lit_route.policy.engines import build_engine, engine_statistics
from lit_route.policy.loss import policy_loss
from lit_route.policy.metrics import step_metrics
from lit_route.policy.options import check_options
from lit_route.policy.pipeline import (
    PendingBatch,
    RewardPipeline,
    Rollout,
    check_pipeline,
    drain_pending,
)
from lit_route.policy.pm_scoring import load_reward_pm, score_groups
from lit_route.policy.sampling import (
    GenerationConfig,
    completion_logits,
    completion_logprobs,
    nucleus_logprobs,
    sequence_inputs,
    token_logprobs,
)
from lit_route.rewards.pairwise import pairwise_rewards
from lit_route.rewards.rloo import kl_per_sequence, rloo_advantages, whiten

log = logging.getLogger(__name__)


class RLOOPolicyModule(PolicyCheckpointing, L.LightningModule):
    """RLOO with a pairwise preference model as the reward.

    Each step samples K completions per prompt, scores all K(K−1) ordered pairs with the PM (both orders of a
    pair in one batch) into an antisymmetric S and a symmetric U, lets reward hooks (the
    :class:`~lit_route.callbacks.UncertaintyRouting` callback) replace entries of S, forms
    ``r_i = mean_{j≠i} S_ij − β·KL_i`` and the leave-one-out advantages, and updates the policy.

    Without any hook the rewards are the PM's alone (the 0%-judge baseline).

    Args:
        policy: The policy's base model.
        lora: LoRA adapters of the policy; the reference is the same model with the adapters disabled.
            ``None`` trains the full model and keeps a separate frozen reference copy.
        pm_ckpt: A finalised PreferenceModule checkpoint used as the reward.
        pm_backbone: Without ``pm_ckpt``: an untrained PM on this backbone (debugging only).
        generation: Sampling settings (K, length, temperature, top-p).
        beta: KL coefficient β.
        kl_estimator: ``k1`` or ``k3``.
        whiten_advantages: Normalise advantages over the batch.
        updates_per_batch: Optimiser steps per sampled batch; from the second one the PPO clipped loss is used.
        clip_eps: PPO clip range.
        lr: Learning rate.
        max_grad_norm: Gradient clipping (``None``: off).
        accumulate_batches: Sampled batches per optimiser step (with ``updates_per_batch == 1`` only: reusing a
            batch for PPO-style updates steps the optimiser on every reuse).
        pm_batch_size: Pairs per PM forward pass.
        separate_reference: Keep a full frozen reference copy even with LoRA.
        sample_seed: Seed added to the number of the sampled batch for sampling (reproducible runs; batches,
            not optimiser steps, so that accumulated batches each draw their own samples).
        pm_share_prefix: Score each group's pairs from the keys and values of the prompt prefix they share (the
            prompt is read once per group instead of once per ordered pair; the same numbers up to rounding).
        split_forward: With LoRA on the top layers only, run the frozen layers below once per batch and only the
            adapted ones for the old log-probabilities and the update (the same numbers, less compute).
        reward_pipeline: s: batches whose judge calls may be in flight while the policy trains (0: each step
            waits for its own verdicts). Step t samples batch t and updates on batch t − s with the PPO-clipped
            loss against the log-probabilities stored at sampling (see ``docs/pipeline.md``).
    """

    def __init__(
        self,
        policy: BackboneSpec | None = None,
        lora: LoraSpec | None = None,
        pm_ckpt: str | None = None,
        pm_backbone: BackboneSpec | None = None,
        generation: GenerationConfig | None = None,
        beta: float = 0.05,
        kl_estimator: str = "k1",
        whiten_advantages: bool = False,
        updates_per_batch: int = 1,
        clip_eps: float = 0.2,
        lr: float = 1e-5,
        max_grad_norm: float | None = 1.0,
        accumulate_batches: int = 1,
        pm_batch_size: int = 16,
        separate_reference: bool = False,
        sample_seed: int = 0,
        pm_share_prefix: bool = True,
        split_forward: bool = True,
        reward_pipeline: int = 0,
    ):
        super().__init__()
        if policy is None:
            raise ValueError("policy: no base model given; set model.policy.model_path "
                             "(builtin:tiny-llama is a tiny random model for tests)")
        self.generation = generation or GenerationConfig()
        check_options(self.generation, beta, kl_estimator, updates_per_batch, clip_eps, lr, max_grad_norm,
                       accumulate_batches, pm_batch_size)
        check_pipeline(reward_pipeline, accumulate_batches)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.policy_spec = policy
        self.tokenizer = load_tokenizer(self.policy_spec)
        base = load_backbone(self.policy_spec, causal_lm=True)
        self.policy = apply_lora(base, lora) if lora is not None else base
        self.policy.train()
        self.reference = None
        if lora is None or separate_reference:
            self.reference = load_backbone(self.policy_spec, causal_lm=True).eval().requires_grad_(False)
        # the reward PM is frozen and not part of this module's state (it has its own checkpoint)
        pm, encoder = load_reward_pm(pm_ckpt, pm_backbone)
        object.__setattr__(self, "_pm", pm)
        object.__setattr__(self, "_pm_encoder", encoder)
        eos = [self.tokenizer.eos_token_id]
        self.eos_ids = [e for e in eos if e is not None]
        self.strict_loading = False
        self.batches_sampled: int | None = None  # None: not known yet (a checkpoint without it: see next_batch)
        self.pipeline = RewardPipeline(reward_pipeline)

    @property
    def pm(self):
        return self._pm

    def on_fit_start(self) -> None:
        self._pm.to(self.device)

    def on_train_end(self) -> None:
        if len(self.pipeline):  # a fit stopped early (trainer.should_stop, max_time): the pending calls are paid
            drain_pending(self)

    def reward_hooks(self):
        return [cb for cb in self.trainer.callbacks if hasattr(cb, "on_pairwise_scores")] if self._trainer else []

    @property
    def engine(self):
        """The rollout engine ``generation.engine`` names (built on first use; assignable, e.g. to share one)."""
        if self.__dict__.get("_engine") is None:
            self.__dict__["_engine"] = build_engine(self.generation, self.policy_spec, self.policy)
        return self.__dict__["_engine"]

    @engine.setter
    def engine(self, engine) -> None:
        self.__dict__["_engine"] = engine

    def _trunk(self) -> Trunk | None:
        """The frozen bottom shared by the reference, old and updated policy, if there is one to share."""
        if not self.hparams.get("split_forward", True) or self.reference is not None:
            return None
        if "_trunk_obj" not in self.__dict__:
            sharded = any("FullyShardedDataParallel" in type(m).__name__ for m in self.policy.modules())
            trunk = None if sharded else Trunk(self.policy)
            self.__dict__["_trunk_obj"] = trunk if trunk is not None and trunk.start is not None else None
        return self.__dict__["_trunk_obj"]

    def _reference_logprobs(self, *args) -> torch.Tensor:
        temperature = self.generation.temperature
        if self.reference is not None:
            return token_logprobs(self.reference, *args, temperature=temperature)
        with self.policy.disable_adapter():
            return token_logprobs(self.policy, *args, temperature=temperature)

    def rollout(self, batch: dict, step: int, hooks=(), trainer=None) -> Rollout:
        """Samples K completions per prompt, scores them, lets ``hooks`` edit the scores, forms the advantages:
        :meth:`start_rollout` then :meth:`finish_rollout`.

        No gradients flow here: an engine runs it on the bare module and only :meth:`update_loss` through its
        distributed wrapper.

        Args:
            batch: A batch of :class:`~lit_route.policy.data.PromptDataModule`.
            step: The number of the batch among the run's sampled batches (seeds the sampling).
            hooks: Reward hooks (``on_pairwise_scores`` / ``on_before_rewards``).
            trainer: What the hooks receive as ``trainer`` (a Trainer, or the Fabric engine's view of one).
        """
        return self.finish_rollout(self.start_rollout(batch, step, hooks, trainer, trained_now=True), hooks, trainer)

    def start_rollout(self, batch: dict, step: int, hooks=(), trainer=None, version: int = 0,
                      trained_now: bool = False) -> PendingBatch:
        """Sampling, PM scores, the hooks' ``on_pairwise_scores`` (judge calls start) and the log-probabilities
        of the sampling policy and the reference: a batch waiting for its verdicts (``version``: optimiser steps
        done so far).

        With ``trained_now`` (the batch is trained on before the next optimiser step) the sampling policy's
        log-probs are not computed here: they are the first update's own forward pass, detached (the ratio is 1,
        and the KL, the advantages and the engine comparison are formed from that pass before its backward)."""
        k = self.generation.num_samples
        b = batch["prompt_ids"].shape[0]
        ctx = RewardContext(batch["messages"], [], torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0))
        with ctx.timer("generation"):
            self.policy.eval()
            self.engine.sync(self.policy, step)  # the weights after `step` optimiser steps (no-op if unchanged)
            out = self.engine.generate(self.policy, batch["prompt_ids"], batch["prompt_mask"], self.generation,
                                       self.eos_ids, self.tokenizer.pad_token_id, self.hparams.sample_seed + step)
            comps, cmask = out.completions, out.mask
            self.policy.train()
            texts = self.tokenizer.batch_decode(comps * cmask.long() + self.tokenizer.pad_token_id * (1 - cmask.long()),
                                                skip_special_tokens=True)
            ctx.completions = [texts[i * k : (i + 1) * k] for i in range(b)]
        with ctx.timer("pm_scoring"):
            s, u = score_groups(self._pm, self._pm_encoder, batch["messages"], ctx.completions, self.hparams.pm_batch_size,
                                share_prefix=self.hparams.get("pm_share_prefix", True))
            ctx.scores, ctx.uncertainty, ctx.pm_scores = s, u, s.clone()
            ctx.judged = torch.zeros_like(s, dtype=torch.bool)
        for hook in hooks:  # start the judge: it runs while the reference log-probs are computed
            hook.on_pairwise_scores(trainer, self, ctx)
        prompt_ids = batch["prompt_ids"].repeat_interleave(k, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(k, 0)
        trunk, hidden = self._trunk(), None
        with ctx.timer("reference_logprobs"), torch.no_grad():
            if trunk is not None:  # one whole pass (the reference) records the frozen bottom's output
                with trunk.capture():
                    ref_logp = self._reference_logprobs(prompt_ids, prompt_mask, comps, cmask)
                hidden = trunk.hidden
            else:
                ref_logp = self._reference_logprobs(prompt_ids, prompt_mask, comps, cmask)
            if trained_now:
                return PendingBatch(prompt_ids, prompt_mask, comps, cmask, None, ref_logp, ctx, hidden, version,
                                    engine_logp=out.logprobs)
            old_logits = self._policy_logits(hidden, prompt_ids, prompt_mask, comps, cmask)
            old_logp = completion_logprobs(old_logits, comps, cmask, self.generation.temperature)
            is_weights = self._engine_check(old_logits, comps, cmask, out.logprobs, ctx.stats)
            del old_logits
        return PendingBatch(prompt_ids, prompt_mask, comps, cmask, old_logp, ref_logp, ctx, hidden, version,
                            is_weights=is_weights)

    def _policy_logits(self, hidden, prompt_ids, prompt_mask, comps, cmask) -> torch.Tensor:
        """(N, T + 1, V) the policy's logits of the completion positions (over the frozen bottom's captured
        output when there is one)."""
        if hidden is None:
            return completion_logits(self.policy, prompt_ids, prompt_mask, comps, cmask)
        inputs = sequence_inputs(prompt_ids, prompt_mask, comps, cmask)
        return self._trunk().forward_top(hidden, inputs["attention_mask"], inputs["position_ids"],
                                         logits_to_keep=comps.shape[1] + 1).logits

    def _engine_check(self, logits, comps, cmask, engine_logp, stats: dict) -> torch.Tensor | None:
        """Compares an engine's log-probs of its samples with the sampling policy's ``logits`` (into ``stats``);
        returns the truncated importance-sampling weights, or ``None``."""
        # an engine reports the log-probs of the truncated distribution it sampled from: like with like
        sampled_logp = None if engine_logp is None else nucleus_logprobs(logits.detach(), comps, cmask,
                                                                         self.generation)
        return engine_statistics(self.engine, engine_logp, sampled_logp, cmask, self.generation.engine_options, stats)

    def finish_rollout(self, pending: PendingBatch, hooks=(), trainer=None, version: int | None = None) -> Rollout:
        """The hooks' ``on_before_rewards`` (verdicts merged into S), then KL, rewards and advantages
        (``version``: optimiser steps done now, for the staleness)."""
        p, ctx = pending, pending.ctx
        b, k = ctx.scores.shape[:2]
        for hook in hooks:
            hook.on_before_rewards(trainer, self, ctx)
        pm_reward = pairwise_rewards(ctx.scores.to(p.ref_logp.device)).view(b, k)
        staleness = 0 if version is None else version - p.version
        rollout = Rollout(p.prompt_ids, p.prompt_mask, p.completions, p.completion_mask, p.old_logp, None,
                          pm_reward, None, ctx, p.trunk_hidden, staleness, p.is_weights)
        if p.old_logp is None:  # the first update's forward pass gives them: see start_rollout
            rollout.ref_logp, rollout.engine_logp = p.ref_logp, p.engine_logp
        else:
            self._advantages(rollout, p.ref_logp)
        return rollout

    def _advantages(self, rollout: Rollout, ref_logp: torch.Tensor) -> None:
        """Fills in the rollout's (B, K) KL to the reference and (B·K,) RLOO advantages of
        ``r_i = mean_{j≠i} S_ij − β·KL_i``."""
        r = rollout
        kl = kl_per_sequence(r.old_logp, ref_logp, r.completion_mask, self.hparams.kl_estimator).view_as(r.pm_reward)
        advantages = rloo_advantages(r.pm_reward - self.hparams.beta * kl)
        if self.hparams.whiten_advantages:
            advantages = whiten(advantages)
        if not torch.isfinite(advantages).all():
            raise FloatingPointError("non-finite advantages: check the PM checkpoint (scores must be finite)")
        r.kl, r.advantages = kl, advantages.flatten()

    def update_loss(self, rollout: Rollout, update: int) -> torch.Tensor:
        """The policy loss of update number ``update`` on ``rollout`` (the forward pass that gradients flow
        through; from the second update on the same rollout, or on a stale one, the PPO-clipped loss)."""
        r = rollout
        logits = self._policy_logits(r.trunk_hidden, r.prompt_ids, r.prompt_mask, r.completions, r.completion_mask)
        logp = completion_logprobs(logits, r.completions, r.completion_mask, self.generation.temperature)
        if r.old_logp is None:  # sampled by the policy of this pass: its log-probs, then KL and advantages, from it
            r.old_logp = logp.detach()
            r.is_weights = self._engine_check(logits, r.completions, r.completion_mask, r.engine_logp, r.ctx.stats)
            self._advantages(r, r.ref_logp)
            r.ref_logp = r.engine_logp = None
        del logits
        return policy_loss(logp, r.old_logp, r.advantages, r.completion_mask,
                           self.hparams.clip_eps if update > 0 or r.staleness > 0 else None, r.is_weights)

    def next_batch(self) -> int:
        """The number of the batch about to be sampled (seeds its sampling), counting on from there."""
        if self.batches_sampled is None:  # a fresh run, or a checkpoint written before batches were counted
            self.batches_sampled = self.global_step * self.hparams.accumulate_batches
        self.batches_sampled += 1
        return self.batches_sampled - 1

    def training_step(self, batch: dict, batch_idx: int):
        hooks = self.reward_hooks()
        if self.hparams.get("reward_pipeline", 0):
            return self._pipelined_step(batch, batch_idx, hooks)
        rollout = self.rollout(batch, self.next_batch(), hooks, self.trainer if hooks else None)
        with rollout.ctx.timer("update"):
            loss = self._update(rollout, batch_idx)
        self.log_step(rollout, loss)
        return loss

    def _pipelined_step(self, batch: dict, batch_idx: int, hooks):
        """Samples this batch, then trains on the batches that are due (none while the pipeline fills)."""
        trainer = self.trainer
        self.pipeline.push(self.start_rollout(batch, self.next_batch(), hooks, trainer if hooks else None,
                                              self.global_step))
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        last = trainer.is_last_batch and max_epochs is not None and trainer.current_epoch + 1 >= max_epochs
        loss = None
        for pending in self.pipeline.due(self.batches_left(trainer.max_steps, self.global_step), last):
            rollout = self.finish_rollout(pending.to(self.device), hooks, trainer if hooks else None, self.global_step)
            with rollout.ctx.timer("update"):
                loss = self._update(rollout, batch_idx)
            self.log_step(rollout, loss)
        return loss

    def batches_left(self, max_steps: int | None, global_step: int) -> float:
        """Batches the run may still train on before ``max_steps`` optimiser steps (``inf``: no step limit)."""
        if max_steps is None or max_steps < 0:
            return float("inf")
        return -(-(max_steps - global_step) // self.hparams.updates_per_batch)

    def _update(self, rollout: Rollout, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        acc = self.hparams.accumulate_batches
        for update in range(self.hparams.updates_per_batch):
            loss = self.update_loss(rollout, update)
            self.manual_backward(loss / acc)
            if (batch_idx + 1) % acc == 0 or update > 0:
                if self.hparams.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()
        return loss.detach()

    def log_step(self, rollout: Rollout, loss: torch.Tensor) -> None:
        """Logs the step's metrics and keeps them in ``last_step``."""
        pending = len(self.pipeline) if self.hparams.get("reward_pipeline", 0) else None
        values = step_metrics(rollout, loss, pending)
        if self.__dict__.get("_after_fit"):  # batches drained as the fit ends: self.log is closed by then
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)
        else:
            b = rollout.pm_reward.shape[0]
            self.log_dict(values, prog_bar=False, on_step=True, batch_size=b)
            # the group-mean reward is 0 by construction (S is antisymmetric): the bar shows what moves
            self.log_dict({"judged": values["judge/fraction"], "kl": values["kl/mean"],
                           "reward_std": values["reward/std"]}, prog_bar=True, logger=False, on_step=True, batch_size=b)
        self.last_step = values

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)
