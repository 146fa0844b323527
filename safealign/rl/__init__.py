"""The RL core shared by every RL algorithm of safealign.

    algorithms   the table of algorithms (--algorithm): roles, advantage estimator, cost, KL placement
    roles        Learner (actor + critics, one DDP/DeepSpeed module), Judge (frozen reward/cost model)
    experience   rollout (G responses per prompt), scoring without gradients, held-out evaluation
    constraint   cost window, J_c (mean or HC-RLHF bound), the Lagrange multiplier
    objective    KL-shaped streams -> per-stream advantages -> the Lagrangian advantage
    update       epochs x minibatches of policy loss (+ KL loss, value losses, PTX)
    save         the trained policy in HF format (LoRA: adapter + merged) and its reload check
    setup        validation, loading and optimiser set-up before anything is written; checkpoints

The formulas are pure functions in ``safealign.algorithms`` (rl, advantages, policy_losses,
lagrange, hc); ``stages/ppo_lag.py`` is the loop that calls these pieces in order.
"""
