"""Sampling seeds: every sampling loop (ppo-lag rollouts and its evaluation, safety-test, eval,
the PPO minibatch order) seeds torch's RNG from one function of (run seed, step, process), so a
resumed or re-run job draws exactly the same responses and batches, whatever ran before it."""

from __future__ import annotations

SALT_ROLLOUT, SALT_MINIBATCH = 0, 1
EVAL_STEP_OFFSET = 10**6     # evaluation batches of a training run: steps that no rollout uses


def sample_seed(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    """The seed of (run seed, step or batch index, process rank, purpose)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + salt) % (2**63 - 1)


def seed_sampling(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    """Seed torch's global RNG (which generate() draws from) with :func:`sample_seed`; returns it."""
    import torch

    s = sample_seed(seed, step, rank, salt)
    torch.manual_seed(s)
    return s
