"""DiffuSpec: the diffusion model drafts, an autoregressive model verifies (docs/sampling.md, "Verifier").

Every forward of the loop is one drafter forward and one verifier forward:

1. **Draft.** The sampler's model (the drafter) reads the canvas; the window is the next k masked positions
   of the block from its first masked one (every position before it holds verified tokens).
2. **Causal-consistency path search (CPS).** Each window position keeps its most probable tokens until
   their probability reaches `diffuspec_mass` (at least one, at most `diffuspec_candidates`; EOS always one).
   A left-to-right beam search (width `diffuspec_beam`) over this lattice scores a path by the sum over its
   tokens of lambda * log p_drafter + (1 - lambda) * log q_proxy(token | what precedes it), q a causal proxy
   (None: the drafter alone). A path ends at its first EOS or at the window's end; the path with the highest
   mean score per token is the draft.
3. **Verify.** The verifier runs once on the canvas with the draft in place. Its greedy token at each window
   position (argmax of its logits one slot earlier) is compared with the draft; the longest agreeing prefix
   is kept and the verifier's own token follows it (at the first disagreement, or after a fully accepted
   draft), inside the block. After an EOS every later position of the answer is EOS.
4. **Adaptive draft length (ADL).** Per row, with L_gen the drafter's own length this step (the position of
   the first EOS of its argmax over the window, else the window's length) and L_acc the accepted draft
   tokens: averages G <- (1 - rho) G + rho L_gen and A <- (1 - rho) A + rho L_acc (both start at 0), and the
   next window is k = clip(floor(G) + delta * [A >= G], k_min, k_max); the first is k_max.

Every written token is the verifier's greedy choice given the tokens before it, so the answer equals greedy
autoregressive decoding with the verifier (`autoregressive_generate`, EOS padding included), whatever the
drafter proposes; a good drafter only saves verifier forwards.
"""

from __future__ import annotations

import torch

from .checks import model_config_value
from .registry import register_verifier
from .step import block_logits, step_outcome
from .verifier import NoVerifier

NEG_INF = float("-inf")


def place(seq: torch.Tensor, values: torch.Tensor, offset: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """seq [b, N] with values[r, j] written at position offset[r] + j for j < count[r] (positions past N dropped)."""
    j = torch.arange(seq.shape[1], device=seq.device) - offset[:, None]
    inside = (j >= 0) & (j < count[:, None]) & (j < values.shape[1])
    return torch.where(inside, values.gather(1, j.clamp(0, values.shape[1] - 1)), seq)


def candidate_lattice(logp: torch.Tensor, candidates: int, mass: float, eos_token_id: int | None) -> torch.BoolTensor:
    """[b, K, V] the tokens CPS may place at each window position: the most probable ones until their
    probability reaches `mass` (the one crossing it included, the top-1 always), at most `candidates`;
    EOS always."""
    probs, order = logp.exp().sort(dim=-1, descending=True, stable=True)
    before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
    rank = torch.arange(logp.shape[-1], device=logp.device)
    keep = (before < mass) & (rank < candidates)
    keep[..., 0] = True
    allowed = torch.zeros_like(keep).scatter(-1, order, keep)
    if eos_token_id is not None:
        allowed[..., eos_token_id] = True
    return allowed


def causal_path(logp, length, context, *, candidates=15, mass=0.8, beam=3, weight=0.5, proxy=None,
                eos_token_id=None) -> tuple[torch.LongTensor, torch.LongTensor]:
    """CPS over a window: logp [b, K, V] the drafter's log-probabilities, length [b] each row's window length
    (<= K), context [b, T] the tokens before the window (what a proxy conditions on). proxy(ctx [n, c]) ->
    [n, V] log-probabilities of the next token after its last `proxy.context_size` tokens (default 1).
    Returns the chosen path [b, K] and its length [b] (an EOS ends it and is part of it)."""
    b, k, vocab = logp.shape
    allowed = candidate_lattice(logp, candidates, mass, eos_token_id)
    tokens = torch.zeros(b, beam, k, dtype=torch.long, device=logp.device)
    score = torch.full((b, beam), NEG_INF, dtype=torch.float64, device=logp.device)
    score[:, 0] = 0.0  # one empty path to start from
    ended = (torch.full((b,), NEG_INF, dtype=torch.float64, device=logp.device), torch.zeros_like(tokens[:, 0]),
             torch.zeros(b, dtype=torch.long, device=logp.device))  # best path that placed EOS: mean, tokens, length
    width = getattr(proxy, "context_size", 1)
    for j in range(k):
        gain = weight * logp[:, j, None, :].double()
        if proxy is not None and weight < 1:
            history = torch.cat([context[:, None, -width:].expand(-1, beam, -1), tokens[..., :j]], -1)[..., -width:]
            gain = gain + (1 - weight) * proxy(history.flatten(0, 1)).view(b, beam, vocab).double()
        total = (score[..., None] + gain).masked_fill(~allowed[:, j, None, :], NEG_INF).flatten(1)
        top, index = total.sort(dim=-1, descending=True, stable=True)  # ties to the lower beam, then the lower id
        top, index = top[:, :beam], index[:, :beam]
        source, token = torch.div(index, vocab, rounding_mode="floor"), index % vocab
        grown = tokens.gather(1, source[..., None].expand(-1, -1, k)).clone()
        grown[..., j] = token
        live = (j < length)[:, None]
        if eos_token_id is not None:  # a path that placed EOS is complete: it leaves the beam
            finished = live & (token == eos_token_id) & torch.isfinite(top)
            mean = (top / (j + 1)).masked_fill(~finished, NEG_INF)
            best, which = mean.max(1)
            better = best > ended[0]
            ended = (torch.where(better, best, ended[0]),
                     torch.where(better[:, None], grown[torch.arange(b), which], ended[1]),
                     torch.where(better, j + 1, ended[2]))
            top = top.masked_fill(finished, NEG_INF)
        tokens = torch.where(live[..., None], grown, tokens)
        score = torch.where(live, top, score)
    full_mean = score[:, 0] / length.clamp(min=1)  # the beam is sorted: its first path is the best complete one
    take_ended = ended[0] > full_mean
    return torch.where(take_ended[:, None], ended[1], tokens[:, 0]), torch.where(take_ended, ended[2], length)


class StartTokenVerifier:
    """An autoregressive verifier that was trained with a start token before every sequence (the project's AR
    recipes use EOS as BOS): it reads [start | canvas] and returns the canvas slots' logits, so DiffuSpec's
    answer is greedy decoding of [start | prompt] with that model."""

    def __init__(self, model, start_token_id: int):
        self.model, self.start, self.config = model, int(start_token_id), model.config

    def __call__(self, input_ids, attention_mask=None):
        x = torch.cat([torch.full_like(input_ids[:, :1], self.start), input_ids], 1)
        if attention_mask is not None:  # left padding: the start token moves right before each row's first token
            rows, pads = torch.arange(len(x), device=x.device), (attention_mask == 0).sum(1)
            x[rows, pads] = self.start
            attention_mask = torch.cat([torch.zeros_like(attention_mask[:, :1]), attention_mask], 1)
            attention_mask[rows, pads] = 1
        out = self.model(x, attention_mask=attention_mask)
        out.logits = out.logits[:, 1:]
        return out


@register_verifier("diffuspec")
class DiffuSpec(NoVerifier):
    """DiffuSpec's draft (the sampler's model), causal-consistency path search, greedy verification by an
    autoregressive model and adaptive draft length (module docstring). The commit rule is not used: the
    verifier decides every token."""

    ends_full_blocks = True

    def __init__(self, verifier_model, draft_lengths=(20, 30), growth: int = 10, ema: float = 0.5,
                 candidates: int = 15, mass: float = 0.8, beam: int = 3, weight: float = 0.5, proxy=None,
                 eos_token_id: int | None = None, logits_eos_inf: bool = False):
        layout = model_config_value(verifier_model, "attention_layout")
        if layout not in (None, "causal"):
            raise ValueError(f"verifier_model must be causal (it reads each token's logits from the slot before), "
                             f"its attention_layout is {layout!r}.")
        self.model = verifier_model
        self.k_min, self.k_max = int(draft_lengths[0]), int(draft_lengths[1])
        self.growth, self.ema, self.eos, self.eos_inf = int(growth), float(ema), eos_token_id, logits_eos_inf
        self.search = dict(candidates=int(candidates), mass=float(mass), beam=int(beam), weight=float(weight),
                           proxy=proxy, eos_token_id=eos_token_id)
        self.k = None  # per caller row: the next window length and the two averages
        self.history = []  # per forward: (rows, window lengths, accepted draft tokens)
        self.verifier_forwards = 0

    @classmethod
    def from_config(cls, config):
        return cls(config.verifier_model, config.diffuspec_draft_lengths, config.diffuspec_growth,
                   config.diffuspec_ema, config.diffuspec_candidates, config.diffuspec_mass, config.diffuspec_beam,
                   config.diffuspec_weight, config.diffuspec_proxy, config.eos_token_id, config.logits_eos_inf)

    def steps_per_block(self, commit):
        return None

    def begin_block(self, state, masked):
        if self.k is None:
            self.k = torch.full((state.batch_size,), self.k_max, dtype=torch.long, device=state.x.device)
            self.mean_gen = torch.zeros(state.batch_size, dtype=torch.float64, device=state.x.device)
            self.mean_acc = torch.zeros_like(self.mean_gen)
        if state.prompt_len == 0:
            raise ValueError("verifier='diffuspec' reads the verifier's first token at the last prompt token; give a "
                             "prompt of at least one token.")

    def step(self, state, parts, config):
        start, end, mask_id = state.block_start, state.block_end, state.mask_token_id
        block = state.x[:, start:end]
        logits = block_logits(state, parts).float()
        if self.eos_inf:
            logits[..., self.eos] = NEG_INF
        logits[..., mask_id] = NEG_INF  # the mask id is never drafted
        b, width = block.shape
        open_ = (block == mask_id).any(1)  # rows whose block is full wait for the others: they draft nothing
        first = (block == mask_id).int().argmax(1)  # every position before it holds verified tokens
        k = torch.minimum(self.k[state.rows], width - first) * open_
        span = int(k.max())
        offsets = torch.arange(span, device=block.device)
        window = (first[:, None] + offsets).clamp(max=width - 1)
        logp = logits.gather(1, window[..., None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)
        before = getattr(self.search["proxy"], "context_size", 1)  # the proxy's view: the tokens before the window
        context = state.x.gather(1, (start + first[:, None] - before + torch.arange(before, device=block.device)).clamp(min=0))
        path, length = causal_path(logp, k, context, **self.search)

        # the verifier reads the canvas with the draft in place; by causality what follows a row's draft is unseen
        x = place(state.x, path, start + first, length)
        drafted = offsets < length[:, None]
        hi = int((start + first + length).max())
        keys = None if state.attn is None else state.attn[:, state.prefix_len : state.prefix_len + hi]
        out = self.model(x[:, :hi], attention_mask=keys)
        state.nfe += 1
        state.forward_tokens += b * hi
        self.verifier_forwards += 1
        read = (start + first[:, None] - 1 + torch.arange(span + 1, device=block.device)).clamp(max=hi - 1)
        greedy = out.logits.argmax(-1).gather(1, read)  # the verifier's token at each window position (and one more)
        accepted = ((path == greedy[:, :span]) & drafted).long().cumprod(1).sum(1)
        written = (accepted + 1) * open_  # the agreeing draft, then the verifier's next token
        new = place(block, greedy, first, written)
        if bool(place(torch.zeros_like(block), (greedy == mask_id).long(), first, written).any()):
            raise RuntimeError("the verifier's greedy token is the mask id, which the canvas cannot hold; give a "
                               "verifier that never predicts it (e.g. its logit at -inf).")
        if self.eos is not None:
            self._pad_after_eos(state, new, start, end)
        self._adapt(state.rows[open_], k[open_], logp.argmax(-1)[open_], accepted[open_])
        confidence = logits.softmax(-1).amax(-1).masked_fill(block != mask_id, NEG_INF)
        return step_outcome(block, new, logits.argmax(-1), confidence, mask_id)

    def _pad_after_eos(self, state, new, start, end):
        """After a row's first EOS in the answer, every later position is EOS (as autoregressive decoding pads)."""
        answer = torch.cat([state.x[:, state.prompt_len : start], new], 1)
        hit = answer == self.eos
        after = (hit.long().cumsum(1) - hit.long()) > 0
        new.masked_fill_(after[:, start - state.prompt_len :], self.eos)
        tail = hit.any(1)
        state.x[tail, end:] = self.eos

    def _adapt(self, rows, k, drafted, accepted):
        """ADL: the next window length from the drafter's own length and what the verifier accepted."""
        span = drafted.shape[1]
        generated = k.clone()
        if self.eos is not None:
            is_eos = (drafted == self.eos) & (torch.arange(span, device=k.device) < k[:, None])
            generated = torch.where(is_eos.any(1), is_eos.int().argmax(1), k)
        self.mean_gen[rows] = (1 - self.ema) * self.mean_gen[rows] + self.ema * generated
        self.mean_acc[rows] = (1 - self.ema) * self.mean_acc[rows] + self.ema * accepted
        grow = (self.mean_acc[rows] >= self.mean_gen[rows]).long() * self.growth
        self.k[rows] = (self.mean_gen[rows].floor().long() + grow).clamp(self.k_min, self.k_max)
        self.history.append((rows.clone(), k.clone(), accepted.clone()))
