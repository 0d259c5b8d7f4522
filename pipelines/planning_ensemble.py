"""Several trained planners decoding as one: at every forward, each member reads the sensors with its own
adapter and backbone, and the plan tokens are chosen from the members' averaged probabilities.

```python
from pipelines.planning import PlanningPipeline
from pipelines.planning_ensemble import ensemble_planner

members = [PlanningPipeline.from_pretrained(f"runs/driving_seed{s}/pipeline") for s in (0, 1, 2)]
pipe = ensemble_planner(members)        # a PlanningPipeline: same call, plan_action, outputs
out = pipe(obs_list, threshold=0.9)
```

Planners trained from different seeds disagree most where the data is thin, which is where one of them
drifts in closed loop; averaging their probabilities (not their logits: a member that is sure and wrong
does not veto the others) is the usual cure for that variance. Every commit rule, confidence order and the
exact prefix cache work unchanged: the members' prefix embeddings travel side by side along the hidden axis,
and each member keeps its own K/V cache. The members must share the sensor layout (adapter config), the plan
tokenizer and the backbone shape; they are diffusion planners (the causal baseline decodes on another path).
The ensemble is built from saved members and is not saved itself.
"""

from __future__ import annotations

import torch

from modalities.base import PrefixEmbeds

from .planning import PlanningPipeline

__all__ = ["ensemble_planner"]


class _EnsembleCache:
    """One K/V cache per member, cropped and row-selected together (the sampler's cache interface)."""

    def __init__(self, caches: list):
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[0].length

    def __len__(self) -> int:
        return len(self.caches[0])

    @property
    def batch_size(self) -> int:
        return self.caches[0].batch_size

    def crop(self, length: int) -> _EnsembleCache:
        return _EnsembleCache([c.crop(length) for c in self.caches])

    def select(self, rows: torch.Tensor) -> _EnsembleCache:
        return _EnsembleCache([c.select(rows) for c in self.caches])

    def clone(self) -> _EnsembleCache:
        return _EnsembleCache([c.clone() for c in self.caches])


class _Members(torch.nn.Module):
    """A list of member modules with the `device` / `dtype` that diffusers reads off a pipeline's components."""

    def __init__(self, modules: list):
        super().__init__()
        self.members = torch.nn.ModuleList(modules)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class _EnsembleAdapter(_Members):
    """The members' adapters; their embeddings [B, P, D] side by side as [B, P, M * D]. Input checks and
    preprocessing are the first member's (the members share the adapter config)."""

    def __init__(self, adapters: list):
        super().__init__(adapters)
        self.config = None  # no single hidden size: the pipeline's width check does not apply
        first = adapters[0]
        self.occupancy_encoder = first.occupancy_encoder
        self.preprocess, self.check_observations, self.row_errors = first.preprocess, first.check_observations, first.row_errors

    def forward(self, inputs) -> PrefixEmbeds:
        outs = [adapter(inputs) for adapter in self.members]
        return PrefixEmbeds(torch.cat([o.embeds for o in outs], -1), outs[0].mask)


class _EnsembleBackbone(_Members):
    """The members' backbones; logits = log of the mean of the members' softmax probabilities."""

    def __init__(self, models: list):
        super().__init__(models)
        self.config = models[0].config

    def forward(self, input_ids=None, prefix_embeds=None, past_key_values=None, **kwargs):
        width = self.config.hidden_size
        outs = []
        for i, model in enumerate(self.members):
            embeds = None if prefix_embeds is None else prefix_embeds[..., i * width : (i + 1) * width]
            cache = None if past_key_values is None else past_key_values.caches[i]
            outs.append(model(input_ids, prefix_embeds=embeds, past_key_values=cache, **kwargs))
        out = outs[0]
        if out.logits is not None:
            probs = torch.stack([o.logits.float().softmax(-1) for o in outs]).mean(0)
            out.logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        if out.past_key_values is not None:
            out.past_key_values = _EnsembleCache([o.past_key_values for o in outs])
        return out


class _PlanningEnsemble(PlanningPipeline):
    def save_pretrained(self, *args, **kwargs):
        raise ValueError("a planner ensemble is not saved: save (or keep) its members and call ensemble_planner "
                         "on them again after loading.")


def ensemble_planner(members: list[PlanningPipeline]) -> PlanningPipeline:
    """One `PlanningPipeline` whose decoder averages the members' plan-token probabilities at every forward."""
    members = list(members)
    if not members or not all(isinstance(m, PlanningPipeline) for m in members):
        raise ValueError("`members` must be a non-empty list of PlanningPipeline (e.g. from_pretrained of each run).")
    first = members[0]
    for i, m in enumerate(members):
        if m.decoding != "diffusion":
            raise ValueError(f"members[{i}] is the causal (autoregressive) baseline; an ensemble averages "
                             "diffusion planners.")
        for what, mine, theirs in (("plan tokenizer", m.config["plan"], first.config["plan"]),
                                   ("adapter config", _public(m.driving_adapter.config), _public(first.driving_adapter.config)),
                                   ("backbone config", _shape(m.model.config), _shape(first.model.config))):
            differ = {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            if differ:
                raise ValueError(f"members[{i}] has another {what} than members[0] (the members must read the same "
                                 f"sensors into the same plan): {differ} as (members[{i}], members[0]).")
    adapter = _EnsembleAdapter([m.driving_adapter for m in members])
    model = _EnsembleBackbone([m.model for m in members])
    pipe = _PlanningEnsemble(adapter, model, first.scheduler, plan=first.config["plan"],
                             action_prior=first.config.get("action_prior"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _public(config) -> dict:
    """A config without diffusers' bookkeeping keys (_class_name, _name_or_path: where it was loaded from)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _shape(config) -> dict:
    """The backbone fields that must agree for the members to decode one canvas together."""
    keys = ("vocab_size", "hidden_size", "mask_token_id", "attention_layout", "block_size", "max_position_embeddings")
    values = dict(config)
    return {k: values.get(k) for k in keys}
