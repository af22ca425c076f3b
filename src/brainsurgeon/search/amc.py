"""AMC: a DDPG agent that walks the layers and picks each one's compression (He et al., ECCV 2018).

"AMC: AutoML for Model Compression and Acceleration on Mobile Devices", Algorithm and sec. 3:
the agent observes a per-layer state s_t = (t, type, n_in, n_out, stride, kernel, cost_t,
reduced, rest, a_{t-1}) (each feature scaled to [0, 1]), emits a continuous action
a_t in [0, 1], explores with truncated-normal noise TN(mu(s_t), sigma^2, 0, 1) whose sigma
decays after the warm-up, and learns from a replay buffer where every transition of an
episode carries the episode's reward minus a moving average (DDPG: critic on
r + gamma * Q'(s', mu'(s')), actor on -Q(s, mu(s)), soft target updates).

Here the action is the fraction of the layer's cost to remove; the layer takes the
least-loss database variant whose cost is within (1 - a_t) of its dense cost (for an
unstructured-sparsity database and a FLOP budget that is exactly sparsity a_t). The budget is
enforced by clipping a_t so the remaining layers can still meet it at their cheapest variants.
Rewards: ``resource`` (resource-constrained): R = -error; ``accuracy`` (accuracy-guaranteed):
R = -error * log(cost), which also rewards plans cheaper than the budget.

Channel spaces (``ch@r`` variants) are not additive: removing a layer's channels also shrinks its
consumers, and two pruned neighbours share one. As in AMC's channel pruning, the agent then walks
a real model (:class:`~.channels.ChannelWalk`): layer t is pruned at the chosen ratio on a copy,
the remaining cost is *measured*, and the action is clipped so that the reduction still needed
is at most what the later layers can remove (each at its largest measured single-layer saving);
the reward is the error of the walked model itself. An episode that still ends over the budget
(the later layers' savings overlap) is penalised and never returned.

    >>> agent = AMCSearch(AMC(mode="resource", episodes=120), table, budget, error_fn)
    >>> plan = agent.run()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._log import get_logger, progress
from ..config import Config, register_config
from ..errors import BudgetInfeasibleError, ConfigError
from .channels import ChannelWalk
from .config import Budget
from .database import Entry, SearchTable
from .plan import Plan
from .solvers import absolute_budget, plan_from_entries

log = get_logger(__name__)


@register_config
@dataclass(frozen=True)
class AMC(Config):
    """Settings of the AMC DDPG agent (defaults: AMC's, with fewer episodes and a smaller net).

    >>> AMC(mode="accuracy", episodes=200, warmup=50)
    """

    mode: str = "resource"  # "resource" (R = -error) or "accuracy" (R = -error * log(cost))
    episodes: int = 150
    warmup: int = 30  # episodes of uniform random actions before learning
    hidden: int = 64
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    batch_size: int = 64
    buffer: int = 2000
    tau: float = 0.01
    discount: float = 1.0
    sigma: float = 0.5  # initial exploration std
    sigma_decay: float = 0.95  # per episode after warm-up
    moving_alpha: float = 0.5  # reward baseline update rate
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("resource", "accuracy"):
            raise ConfigError(f"AMC.mode: must be 'resource' or 'accuracy', got {self.mode!r}")
        if not (0 <= self.warmup < self.episodes):
            raise ConfigError(f"AMC: need 0 <= warmup < episodes, got warmup={self.warmup}, "
                              f"episodes={self.episodes}")
        for f in ("hidden", "batch_size", "buffer"):
            if getattr(self, f) < 1:
                raise ConfigError(f"AMC.{f}: must be >= 1, got {getattr(self, f)}")
        if not (0 < self.tau <= 1 and 0 <= self.discount <= 1 and self.sigma > 0 and 0 < self.sigma_decay <= 1):
            raise ConfigError("AMC: need 0 < tau <= 1, 0 <= discount <= 1, sigma > 0, 0 < sigma_decay <= 1")


def _mlp(n_in: int, hidden: int, out_act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([out_act] if out_act is not None else []))


def truncated_normal(mu: float, sigma: float, rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    """One sample of N(mu, sigma^2) truncated to [lo, hi] (rejection; clamp after 100 tries)."""
    for _ in range(100):
        x = rng.normal(mu, sigma)
        if lo <= x <= hi:
            return float(x)
    return float(min(max(mu, lo), hi))


class DDPG:
    """Actor mu(s) in [0, 1], critic Q(s, a), their targets, a replay buffer, and one update step."""

    def __init__(self, n_state: int, cfg: AMC) -> None:
        self.cfg = cfg
        self.actor, self.critic = _mlp(n_state, cfg.hidden, nn.Sigmoid()), _mlp(n_state + 1, cfg.hidden, None)
        self.actor_t, self.critic_t = _mlp(n_state, cfg.hidden, nn.Sigmoid()), _mlp(n_state + 1, cfg.hidden, None)
        self.actor_t.load_state_dict(self.actor.state_dict())
        self.critic_t.load_state_dict(self.critic.state_dict())
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.memory: list[tuple[np.ndarray, float, float, np.ndarray, float]] = []
        self.baseline: float | None = None

    def act(self, s: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.actor(torch.as_tensor(s, dtype=torch.float32)[None])[0, 0])

    def remember(self, s: np.ndarray, a: float, r: float, s1: np.ndarray, done: bool) -> None:
        self.memory.append((s, a, r, s1, float(done)))
        del self.memory[: max(0, len(self.memory) - self.cfg.buffer)]

    def update(self, rng: np.random.Generator) -> None:
        """One DDPG step on a minibatch (AMC: reward minus its moving average, soft target updates)."""
        idx = rng.integers(0, len(self.memory), size=min(self.cfg.batch_size, len(self.memory)))
        s, a, r, s1, d = (torch.as_tensor(np.array(x), dtype=torch.float32)
                          for x in zip(*(self.memory[i] for i in idx), strict=True))
        a, r, d = a[:, None], r[:, None], d[:, None]  # (b, 1)
        mean_r = float(r.mean())
        self.baseline = mean_r if self.baseline is None else self.baseline + self.cfg.moving_alpha * (
            mean_r - self.baseline)
        with torch.no_grad():
            q_next = self.critic_t(torch.cat([s1, self.actor_t(s1)], 1))
            y = (r - self.baseline) + self.cfg.discount * (1 - d) * q_next  # (b, 1)
        loss_c = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), y)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters(), strict=True):
                    pt.mul_(1 - self.cfg.tau).add_(self.cfg.tau * p)


class AMCSearch:
    """Run AMC over a database table. `error_fn(entries) -> error` scores a full per-layer choice.

    >>> plan = AMCSearch(AMC(episodes=100, warmup=20), table, Budget("flops", 0.5), error_fn).run()
    """

    def __init__(self, cfg: AMC, table: SearchTable, budget: Budget,
                 error_fn: Callable[[list[Entry]], float], walk: ChannelWalk | None = None,
                 model_error: Callable[[nn.Module], float] | None = None) -> None:
        """walk, model_error: for a channel space, the environment and the error of a walked model."""
        if (walk is None) != (model_error is None):
            raise ConfigError("AMCSearch: pass both walk= and model_error= (a channel space) or neither")
        self.cfg, self.table, self.budget, self.error_fn = cfg, table, budget, error_fn
        self.walk, self.model_error = walk, model_error
        self.metric = budget.metric
        self.B = absolute_budget(table, budget)
        rows = [table.entries[n] for n in table.layers]
        self.B_all = budget.fraction * table.dense_total(self.metric)  # the walk measures every supported layer
        self.save_max = [max(r[0].costs[self.metric] - e.costs[self.metric] for e in r) for r in rows]
        self.dense = [r[0].costs[self.metric] for r in rows]  # entry 0 is the dense variant
        self.cheap = [min(e.costs[self.metric] for e in r) for r in rows]
        self.total = sum(self.dense)
        feats = np.array([[t, p.kind == "conv", p.in_channels, p.out_channels, p.stride, p.kernel, c]
                          for t, (p, c) in enumerate(zip((table.profiles[n] for n in table.layers), self.dense,
                                                         strict=True))], dtype=np.float64)
        self.static = feats / np.maximum(feats.max(0), 1e-12)  # (L, 7) scaled to [0, 1]

    def _state(self, t: int, reduced: float, rest: float, a_prev: float) -> np.ndarray:
        return np.concatenate([self.static[t], [reduced / self.total, rest / self.total, a_prev]]).astype(np.float32)

    def _pick(self, t: int, a: float) -> Entry:
        """Least-score variant with cost <= (1 - a) * dense cost (the cheapest if none)."""
        rows = self.table.entries[self.table.layers[t]]
        target = (1 - a) * self.dense[t] * (1 + 1e-9)
        fit = [e for e in rows if e.costs[self.metric] <= target]
        return min(fit, key=lambda e: (e.score, -e.costs[self.metric])) if fit else \
            min(rows, key=lambda e: e.costs[self.metric])

    def _action(self, agent: DDPG, s: np.ndarray, rng: np.random.Generator, explore: str, sigma: float) -> float:
        if explore == "random":
            return float(rng.uniform())
        mu = agent.act(s)
        return truncated_normal(mu, sigma, rng) if explore == "noise" else mu

    def channel_episode(self, agent: DDPG, rng: np.random.Generator, explore: str, sigma: float
                        ) -> tuple[list[Entry], list[tuple[np.ndarray, float, np.ndarray]], float]:
        """One walk over a channel space; returns (choices, transitions, measured cost)."""
        assert self.walk is not None
        walk, L = self.walk, len(self.dense)
        walk.reset()
        dense_all = walk.cost
        chosen, steps = [], []
        s = self._state(0, 0.0, self.total - self.dense[0], 0.0)
        for t in range(L):
            a = self._action(agent, s, rng, explore, sigma)
            rows = sorted(self.table.entries[self.table.layers[t]], key=lambda e: e.sparsity)  # dense first
            need = walk.cost - self.B_all - sum(self.save_max[t + 1:])  # what layer t must remove at least
            e = max((e for e in rows if e.sparsity <= a + 1e-9), key=lambda e: e.sparsity)
            saving = {x.variant: self.dense[t] - x.costs[self.metric] for x in rows}  # measured, this layer alone
            if saving[e.variant] < need:  # AMC's clip: the smallest ratio that keeps the budget reachable
                e = next((x for x in rows if saving[x.variant] >= need), max(rows, key=lambda x: saving[x.variant]))
            chosen.append(e)
            cost = walk.step(e.layer, None if not e.structural else self._config(e))
            rest = sum(self.dense[t + 1:])
            s1 = self._state(min(t + 1, L - 1), dense_all - cost,
                             rest - (self.dense[t + 1] if t + 1 < L else 0.0), e.sparsity)
            steps.append((s, e.sparsity, s1))
            s = s1
        return chosen, steps, walk.cost

    @staticmethod
    def _config(e: Entry) -> Config:
        from ..config import config_from_dict

        return config_from_dict(e.configs[0])

    def episode(self, agent: DDPG, rng: np.random.Generator, explore: str, sigma: float
                ) -> tuple[list[Entry], list[tuple[np.ndarray, float, np.ndarray]]]:
        L = len(self.dense)
        spent, reduced, chosen, steps = 0.0, 0.0, [], []
        s = self._state(0, 0.0, self.total - self.dense[0], 0.0)
        for t in range(L):
            a = self._action(agent, s, rng, explore, sigma)
            room = self.B - spent - sum(self.cheap[t + 1:])  # what this layer may still cost
            a_min = max(0.0, 1 - room / self.dense[t]) if self.dense[t] > 0 else 0.0
            a_max = 1 - self.cheap[t] / self.dense[t] if self.dense[t] > 0 else 0.0
            a = min(max(a, a_min), a_max)  # AMC: clip the action so the budget stays reachable
            e = self._pick(t, a)
            chosen.append(e)
            spent += e.costs[self.metric]
            reduced += self.dense[t] - e.costs[self.metric]
            rest = sum(self.dense[t + 1:])
            s1 = self._state(min(t + 1, L - 1), reduced, rest - (self.dense[t + 1] if t + 1 < L else 0.0), a)
            steps.append((s, a, s1))
            s = s1
        return chosen, steps

    def reward(self, chosen: list[Entry], cost: float | None = None) -> tuple[float, float]:
        """(reward, error) of a full choice; `cost`: the measured cost of a walked (channel) model."""
        if cost is None:
            err = float(self.error_fn(chosen))
            cost = sum(e.costs[self.metric] for e in chosen) + (0.0 if self.metric == "latency"
                                                                 else self.table.fixed_cost(self.metric))
        else:
            assert self.walk is not None and self.model_error is not None
            err = float(self.model_error(self.walk.model))
            if cost > self.B_all * (1 + 1e-9):  # over budget after all: worse than any feasible plan
                return -1.0 - err - cost / self.B_all, err
        if self.cfg.mode == "resource":
            return -err, err
        return -err * math.log(max(cost, 1.0 + 1e-9)), err

    def run(self) -> Plan:
        """Train for cfg.episodes and return the best plan seen (highest reward), all within budget."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            agent = DDPG(self.static.shape[1] + 3, cfg)
            best: tuple[tuple[float, float], list[Entry], float, float | None] | None = None
            sigma = cfg.sigma
            for ep in progress(range(cfg.episodes), desc="AMC episodes"):
                explore = "random" if ep < cfg.warmup else "noise"
                if ep >= cfg.warmup:
                    sigma *= cfg.sigma_decay
                cost = None
                if self.walk is not None:
                    chosen, steps, cost = self.channel_episode(agent, rng, explore, sigma)
                else:
                    chosen, steps = self.episode(agent, rng, explore, sigma)
                R, err = self.reward(chosen, cost)
                rank = (R, -sum(e.score for e in chosen))  # ties (equal accuracy): the lower database loss
                fits = cost is None or cost <= self.B_all * (1 + 1e-9)
                if fits and (best is None or rank > best[0]):
                    best = (rank, chosen, err, cost)
                for t, (s, a, s1) in enumerate(steps):
                    agent.remember(s, a, R, s1, t == len(steps) - 1)
                    if ep >= cfg.warmup:
                        agent.update(rng)
                log.debug("AMC episode %d: reward %.4f error %.4f", ep, R, err)
        if best is None:
            raise BudgetInfeasibleError(f"AMC: no episode of {cfg.episodes} met the measured budget {self.budget} "
                                        f"(the channel savings of coupled layers overlap); relax the budget, add "
                                        f"higher channel ratios or run more episodes")
        plan = plan_from_entries(self.table, best[1], self.budget, f"amc-{cfg.mode}")
        plan.info.update(reward=round(best[0][0], 6), error=round(best[2], 6))
        if best[3] is not None:  # channel walk: the measured cost
            plan.info.update(cost=round(best[3] / self.table.dense_total(self.metric), 6),
                             cost_estimate=plan.info["cost"])
        return plan
