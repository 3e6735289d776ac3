"""A mixture-of-experts model's router: its load-balancing loss, balanced over the global batch, and
the experts' load for the logs (docs/training.md#mixture-of-experts).

transformers' MoE models (Qwen3-MoE, Qwen2-MoE, Qwen3.5-MoE, Mixtral, OLMoE, gpt-oss, ...) return each
MoE layer's router logits ([tokens, experts]) when asked for output_router_logits, and their own
load_balancing_loss_func makes one forward's logits into N_E * sum_i f_i * P_i: f_i the share of
the top-k selections expert i gets, P_i its mean gate probability, both pooled over layers and
tokens. Here f comes from the whole optimizer step instead of one micro-batch (Qwen's global-batch
balancing, Qiu et al. 2025, arXiv 2501.11873): the selections of every process, summed in the
forward (detached), over the step's micro-batches so far, since a later micro-batch's selections
are not known when an earlier one runs backward. Each micro-batch contributes its own tokens' part
of the sum, normalised by the real tokens of the whole step (all processes, all micro-batches,
counted before the first forward as the target tokens are). So with one micro-batch a step the
loss is the global batch's whatever the split across processes; with accumulation, micro-batch m's
f counts micro-batches 1..m. One process and one micro-batch give load_balancing_loss_func's value
exactly. Padding never counts; prompt tokens do (the router routes them at inference too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftloop import runtime


@dataclass(frozen=True)
class Router:
    experts: int
    top_k: int
    coef: float  # the loss's weight in the step's loss; 0: its load is still logged


def expert_count(config) -> int:
    """The experts of each MoE layer, as the (text) config names them; 0 for a dense model."""
    config = config.get_text_config()
    return max(int(getattr(config, k, None) or 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def of(model, coef: float | None) -> Router | None:
    """The model's router, from its config (router_aux_loss_coef unless --router_aux_loss_coef says),
    or None for a model without one (its balancing loss asked for: a one-line error)."""
    config = runtime.unwrapped(model).config.get_text_config()
    own = getattr(config, "router_aux_loss_coef", None)
    experts = expert_count(config)
    top_k = getattr(config, "num_experts_per_tok", None)
    name = type(runtime.unwrapped(model)).__name__
    if own is None or not hasattr(config, "output_router_logits"):
        if coef:
            raise SystemExit(f"error: --router_aux_loss_coef {coef}: {name} has no router whose logits transformers "
                             "returns (no router_aux_loss_coef and output_router_logits in its config)")
        return None
    if not experts or not top_k:
        raise SystemExit(f"error: {name}'s config names no expert count (num_experts, num_local_experts) or top-k "
                         "(num_experts_per_tok): its router's balancing loss cannot be computed")
    return Router(experts, int(top_k), float(own if coef is None else coef))


class Balance:
    """One optimizer step's balancing: the experts' selection counts so far, over every process."""

    def __init__(self, router: Router, accelerator, step_tokens: torch.Tensor):
        self.router, self.accelerator, self.step_tokens = router, accelerator, step_tokens.clamp(min=1)
        self.counts = None      # [layers, experts]: selections over the step's micro-batches so far, all processes
        self.tokens = 0.0       # the real tokens they came from
        self.loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # this process's part (logged)

    def micro_batch_loss(self, router_logits: list[torch.Tensor], token_mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's part of the step's balancing loss (differentiable through the gate
        probabilities), from each MoE layer's router logits [tokens, experts]."""
        mask = token_mask.reshape(-1, 1).float()
        probs = [torch.softmax(logits.float(), dim=-1) for logits in router_logits]
        with torch.no_grad():
            chosen = [torch.zeros_like(p).scatter_(1, p.topk(self.router.top_k, dim=-1).indices, 1.0) * mask
                      for p in probs]
            local = torch.cat([torch.stack([c.sum(0) for c in chosen]).reshape(-1), mask.sum().reshape(1)])
            total = runtime.summed(self.accelerator, local)  # every process's selections: the same on all
            counts = total[:-1].reshape(len(probs), self.router.experts)
            self.counts = counts if self.counts is None else self.counts + counts
            self.tokens = self.tokens + total[-1]
            share = self.counts.sum(0) / (len(probs) * self.tokens).clamp(min=1)  # f, pooled over layers
        gate_sums = sum((p * mask).sum(0) for p in probs)  # P's sums over this micro-batch's real tokens
        loss = self.router.experts * (share * gate_sums).sum() / (len(probs) * self.step_tokens)
        self.loss += loss.detach()
        return loss

    def load(self) -> dict:
        """The step's numbers for the logs: the loss (this process's part: reduce_sums adds the
        processes') and the busiest and idlest expert's share of its layer's selections, over all
        layers (uniform: 1/experts), divided by the processes since reduce_sums adds them up."""
        world = self.accelerator.num_processes
        if self.counts is None:
            return {}
        shares = self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)
        return {"router_aux_loss": self.loss, "expert_share_max": shares.max() / world,
                "expert_share_min": shares.min() / world}
