"""A new modality is three pieces: an adapter, a task, a recipe (docs/adding-a-modality.md). This test writes
all three itself, registers them, and trains them through train.py: a first stage trains everything (the
stand-in for a pretrained backbone that reads prefixes), the second trains the adapter with the backbone frozen."""

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers looks the loading base up here
from trainer_checks import logged_losses

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
import train as train_cli
from latent.backbone import DiffusionTransformer
from latent.losses import sft_loss
from latent.training.task import TASKS, StepLoss, Task, register_task, step_generator
from modalities.base import ModalityAdapter, PrefixEmbeds, adapter_class, register_adapter
from pipelines.tasks.common import sft_noise

VOCAB, EOS, MASK = 8, 6, 7


# ---- 1. the adapter: raw input -> prefix embeddings --------------------------------------------------
@register_adapter("toy_vector")
class ToyVectorAdapter(ModalityAdapter):
    """A 4-number reading becomes `slots` prefix embeddings."""

    @register_to_config
    def __init__(self, hidden_size: int = 32, in_dim: int = 4, slots: int = 2):
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, hidden_size * slots)

    @torch.no_grad()
    def preprocess(self, raw):
        return torch.as_tensor(raw, dtype=torch.float32).reshape(-1, self.config.in_dim)

    @property
    def num_prefix_tokens(self):
        return self.config.slots

    def forward(self, x):
        embeds = self.proj(x).view(x.shape[0], self.config.slots, self.config.hidden_size)
        return PrefixEmbeds(embeds, None)


# ---- 2. the task: data, loss, export ------------------------------------------------------------------
@dataclass
class ToyData:
    in_dim: int = 4


@register_task("toy_vector")
class ToyVectorTask(Task):
    """Answer which of the 4 numbers is largest: the target is [its index, EOS] after the prefix."""

    sections = {"data": ToyData}
    free_sections = ("model", "adapter")
    aliases = {"adapter": ["adapter.*"], "backbone": ["model.*"]}
    eval_fields = ("val_loss",)

    def build(self):
        model = DiffusionTransformer(vocab_size=VOCAB, mask_token_id=MASK, attention_layout="prefix",
                                     **dict(self.cfg.model))
        adapter = ToyVectorAdapter(hidden_size=model.config.hidden_size, in_dim=self.cfg.data.in_dim)
        return {"adapter": adapter, "model": model}

    def batch(self, step, stage):
        g = step_generator(self.ctx.seed, step)
        b = stage.batch_size or self.cfg.trainer.batch_size
        x = torch.randn(b, self.cfg.data.in_dim, generator=g)
        ids = torch.stack([x.argmax(1), torch.full((b,), EOS)], 1)
        t, noise = sft_noise(g, b, ids.shape[1])
        return {"x": x, "ids": ids, "t": t, "noise": noise}

    def loss(self, modules, batch, stage):
        prefix = modules.adapter(batch["x"])

        def call(ids, attention_mask=None, **kw):
            return modules.model(ids, prefix_embeds=prefix.embeds, prefix_length=prefix.length)

        zero = torch.zeros(len(batch["ids"]), dtype=torch.long)
        return StepLoss(sft_loss(call, batch["ids"], MASK, prompt_lengths=zero, t=batch["t"],
                                 noise=batch["noise"]).loss)

    def evaluate(self, modules, step):
        return {"val_loss": float(self.loss(modules, self.batch(10**6, self.cfg.stages[0]), None).loss)}

    def export(self, modules, folder, stage):
        modules.adapter.save_pretrained(str(folder / "adapter"))
        modules.model.save_pretrained(str(folder / "model"))


# ---- 3. the recipe --------------------------------------------------------------------------------------
RECIPE = """
task: toy_vector
run: {{name: toy, output_dir: {out}, seed: 0}}
model: {{hidden_size: 32, num_layers: 2, num_heads: 2, max_position_embeddings: 16}}
trainer: {{batch_size: 32, log_every: 1, save_every: 0, progress: false, tensorboard: false, plot: false}}
optim: {{warmup_steps: 0}}
stages:
  - {{name: warmup, steps: 60, lr: 1.0e-2}}
  - {{name: adapter, steps: 30, lr: 1.0e-2, train: [adapter]}}
"""


def test_a_toy_modality_trains_through_train_py_with_the_backbone_frozen(tmp_path):
    try:
        recipe = tmp_path / "toy.yaml"
        recipe.write_text(RECIPE.format(out=tmp_path / "run"))
        result = train_cli.main([str(recipe)])
        assert result.completed
        run = Path(result.run_dir)
        assert [s for s, _ in logged_losses(run)] == list(range(1, 91))
        first, last = result.evals[0]["val_loss"], result.evals[-1]["val_loss"]
        assert last < 0.5 * first, (first, last)  # it learned to read the reading
        # the second stage never moved the backbone and did move the adapter
        warm, end = run / "pipelines" / "warmup", run / "pipeline"
        for part, same in (("model", True), ("adapter", False)):
            cls = DiffusionTransformer if part == "model" else ToyVectorAdapter
            x, y = cls.from_pretrained(str(warm / part)).state_dict(), cls.from_pretrained(str(end / part)).state_dict()
            assert all(torch.equal(x[k], y[k]) for k in x) == same, part
        adapter = ToyVectorAdapter.from_pretrained(str(end / "adapter"))
        assert adapter_class("toy_vector") is ToyVectorAdapter and adapter.config.slots == 2
    finally:
        TASKS.unregister("toy_vector")
