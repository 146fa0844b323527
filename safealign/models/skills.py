"""Modules of safe crowd skills: the VPL latent preference model, the pooled Bradley-Terry baseline,
the z -> soft-prompt prefix of the skill policy, and the high-level policy over z.

Text enters every small model as a hashed bag of words (algorithms.skills.bow_features); the skill policy is a causal LM whose input embeddings get a prefix.

The z -> prefix module (:class:`ZPrefix`) is saved as ``z_prefix.safetensors`` + ``z_prefix.json`` beside the
LM; :func:`load_zprefix` reads it with torch + safetensors only. Using a skill from plain transformers::

    lm = AutoModelForCausalLM.from_pretrained(skills_dir)               # the merged LM (or the base + peft adapter/)
    zp = load_zprefix(skills_dir)                                       # or: the 4 tensors of z_prefix.safetensors
    prefix = zp(z)                                                      # z [B, z_dim] -> [B, n_prefix, hidden]
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], 1)     # prefix first, then the prompt's tokens
    mask = torch.cat([torch.ones(B, n_prefix), attention_mask], 1)
    lm.generate(inputs_embeds=embeds, attention_mask=mask, ...)         # or prefix_logits()/sample_with_prefix() below
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from safealign.algorithms import skills as S

ZPREFIX_WEIGHTS, ZPREFIX_CONFIG = "z_prefix.safetensors", "z_prefix.json"


def pair_features(prompts: list[str], responses: list[str], dim: int) -> torch.Tensor:
    """[N, dim]: hashed bag of words of the response. (The decoder below is linear in these features, so
    words of the prompt, the same for both answers of a pair, would cancel out of every preference.)"""
    return S.bow_features(responses, dim)


class VPL(nn.Module):
    """Variational preference model: q(z | context pairs), learned prior p(z), decoder r(y, z).

    ``e = E phi(y)`` (linear embedding of the features, [.., H]); posterior from the mean over the context
    pairs of MLP(e_chosen - e_rejected); decoder ``r(y, z) = e . (a + B z)``: a bilinear reward, one linear
    reward per z. Low capacity on purpose: an MLP decoder memorises each training pair (each pair has one
    annotator) and never needs z. Shapes: F features, a context set of C pairs per annotator, A annotators."""

    def __init__(self, features: int, hidden: int, z_dim: int):
        super().__init__()
        self.embed = nn.Linear(features, hidden)                                          # [.., F] -> [.., H]
        self.pair = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu, self.to_logvar = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        nn.init.constant_(self.to_logvar.bias, -4.0)   # start with narrow posteriors: at sigma 1 the sampled z is pure noise and the decoder learns to ignore it
        self.prior_mu = nn.Parameter(torch.zeros(z_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(z_dim))
        self.a = nn.Parameter(torch.zeros(hidden))
        self.B = nn.Parameter(torch.randn(hidden, z_dim) / hidden ** 0.5)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))               # loss calls: the KL schedule's clock

    def posterior(self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """chosen, rejected [A, C, F] (each context pair as the annotator labelled it), mask [A, C] -> mu, logvar [A, D]"""
        h = self.pair(self.embed(chosen) - self.embed(rejected))                          # [A, C, H]
        pooled = S.masked_mean(h, mask, dim=-2)                                         # [A, H]
        return self.to_mu(pooled), self.to_logvar(pooled).clamp(-8.0, 4.0)

    def reward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x [A, T, F], z [A, D] -> r [A, T]"""
        w = self.a + z @ self.B.T                                                       # [A, H]
        return (self.embed(x) * w.unsqueeze(1)).sum(-1)


class PooledBT(nn.Module):
    """One Bradley-Terry reward for all annotators (the reward-combination baseline's r-hat): linear in the
    features, the VPL decoder's family without z."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., F] -> r [...]"""
        return self.net(x).squeeze(-1)


class ZPrefix(nn.Module):
    """z -> n_prefix soft-prompt embeddings: ``scale * (W2 tanh(W1 z + b1) + b2).reshape(n_prefix, hidden_size)``.

    ``scale`` is a fixed multiplier: under Adam it makes the prefix move ``scale`` times faster than a weight of the
    LM at the same learning rate (the prefix is what has to carry every difference between the users)."""

    def __init__(self, z_dim: int, n_prefix: int, hidden_size: int, mlp_hidden: int, scale: float = 1.0):
        super().__init__()
        self.z_dim, self.n_prefix, self.hidden_size, self.mlp_hidden, self.scale = z_dim, n_prefix, hidden_size, mlp_hidden, float(scale)
        self.fc1 = nn.Linear(z_dim, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, n_prefix * hidden_size)
        nn.init.normal_(self.fc2.weight, std=0.02 / self.scale)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z_dim] -> [B, n_prefix, hidden_size]"""
        return self.scale * self.fc2(torch.tanh(self.fc1(z))).view(z.shape[0], self.n_prefix, self.hidden_size)

    def config(self) -> dict:
        return {"format": "safealign-z-prefix-v1", "z_dim": self.z_dim, "n_prefix": self.n_prefix, "hidden_size": self.hidden_size,
                "mlp_hidden": self.mlp_hidden, "scale": self.scale,
                "formula": "prefix = scale * (fc2.weight @ tanh(fc1.weight @ z + fc1.bias) + fc2.bias).reshape(n_prefix, hidden_size)",
                "usage": "prepend prefix to the LM's input embeddings of the prompt (attention mask 1 on the prefix, "
                         "positions counted over attended tokens); the LM is the model directory beside this file"}


def save_zprefix(module: ZPrefix, out: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    from safealign.runtime.io import atomic_write_json

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(Path(out) / ZPREFIX_WEIGHTS))
    atomic_write_json(Path(out) / ZPREFIX_CONFIG, {**module.config(), **(extra or {})})


def load_zprefix(path: str | Path) -> ZPrefix:
    """The saved z -> prefix module of a skills directory (safetensors + json, no pickle)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / ZPREFIX_CONFIG).read_text())
    m = ZPrefix(cfg["z_dim"], cfg["n_prefix"], cfg["hidden_size"], cfg["mlp_hidden"], cfg.get("scale", 1.0))
    m.load_state_dict(load_file(str(Path(path) / ZPREFIX_WEIGHTS)))
    return m.eval()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefix_logits(lm, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` after the soft prefix.   prefix [B, K, H], ids/mask [B, L] -> [B, L, V]
    (position t predicts token t + 1, as for a plain LM; the prefix positions are dropped)."""
    emb = lm.get_input_embeddings()(ids)                                                # [B, L, H]
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
    out = lm(inputs_embeds=torch.cat([prefix.to(emb.dtype), emb], dim=1), attention_mask=full_mask, position_ids=_positions(full_mask))
    return out.logits[:, prefix.shape[1]:]


def response_logprob(lm, prefix: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """Summed log pi(response | prompt, prefix) of right-padded prompt + response + EOS sequences.

    ids/mask [B, L], prompt_len [B] (tokens before the response) -> [B]"""
    if prefix is None:
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    else:
        logits = prefix_logits(lm, prefix, ids, mask)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)   # [B, L-1]
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    keep = (pos >= prompt_len[:, None]) & mask[:, 1:].bool()                                            # response tokens + EOS
    return (logp * keep).sum(-1)


@torch.no_grad()
def sample_with_prefix(lm, prefix: torch.Tensor | None, prompt_ids: list[list[int]], *, pad_id: int, eos_id: int,
                       max_new_tokens: int, temperature: float = 1.0) -> list[list[int]]:
    """Sample one response per prompt after its prefix (None: no prefix); seed torch's RNG beforehand.
    Layout [prefix, left padding, prompt]: padding is masked and positions count attended tokens only,
    so this equals [padding, prefix, prompt]. temperature 0: greedy. Returns token ids up to the first EOS."""
    dev = next(lm.parameters()).device
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((B, L), dtype=torch.long, device=dev)
    for i, p in enumerate(prompt_ids):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p, device=dev), 1
    emb = lm.get_input_embeddings()(ids)
    if prefix is not None:
        emb = torch.cat([prefix.to(emb.dtype).to(dev), emb], dim=1)
        mask = torch.cat([torch.ones((B, prefix.shape[1]), dtype=torch.long, device=dev), mask], dim=1)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    gen: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1).squeeze(-1)
        for i in range(B):
            if not done[i]:
                gen[i].append(int(nxt[i]))
        done |= nxt == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=_positions(mask)[:, -1:], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return gen


class HighLevelPolicy(nn.Module):
    """pi(u | prompt) = N(W bow(prompt) + b, diag exp(log_std)^2); z = squash_to_prior(u) (see algorithms.skills)."""

    def __init__(self, features: int, z_dim: int, init_std: float):
        super().__init__()
        self.mean = nn.Linear(features, z_dim)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.full((z_dim,), float(torch.log(torch.tensor(init_std)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, F] -> mean of u [B, D]"""
        return self.mean(x)
