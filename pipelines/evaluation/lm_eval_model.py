"""The lm-evaluation-harness model "mmdlm": a TextDiffusionPipeline folder scored and sampled by lm-eval.

Importing this module registers the model (lm-eval 0.4.13 finds models only through its registry, which
it fills at import time; it reads no entry points), so use it through `mmdlm eval ...` (pipelines.evaluation.
lm_eval_cli), or from Python:

```python
import lm_eval
import pipelines.evaluation.lm_eval_model  # noqa: F401  (registers "mmdlm")

lm_eval.simple_evaluate(model="mmdlm", model_args="pretrained=runs/text_tiny/pipeline,mc_samples=64",
                        tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path="tasks/"))
```

- loglikelihood: the Monte-Carlo ELBO of the continuation with only continuation tokens masked
  (pipelines.evaluation.likelihood; `estimator=tokens` LLaDA's l ~ U{1..L} form, or `time`); is_greedy:
  one argmax step on the fully masked continuation gives it. A causal model: the exact log-likelihood.
  Contexts longer than the model's context (`max_length`, default max_position_embeddings) lose their
  oldest tokens; a continuation that alone does not fit is an error.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens, each window scored
  like a loglikelihood request (its continuation given the window's context); the sum over windows.
- generate_until: the pipeline's sampler (gen_length, steps, block_length, threshold, temperature,
  remasking, cache), text decoded up to EOS, cut at the first `until` string and at `max_gen_toks` tokens.
  A request's `temperature` (or `do_sample=False`, temperature 0) overrides the model argument.

Same `seed`, same numbers: ELBO draws are seeded per request by its tokens; generation by `seed` per call.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..text import TextDiffusionPipeline
from .likelihood import ESTIMATORS, causal_loglikelihood, diffusion_loglikelihood, request_generator

__all__ = ["MMDLMEvalModel"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _count(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or isinstance(value, bool) or (isinstance(value, float) and value != number):
        raise ValueError(f"model argument {name}={value!r} must be a positive integer")
    return number


def _pick_device(device: str | None) -> torch.device:
    """The device asked for; lm-eval's command line asks for cuda:0 unless told otherwise, so a CUDA device on a
    machine without one means the CPU (logged)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    picked = torch.device(device)
    if picked.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s was asked for but CUDA is not available; running on the CPU", device)
        return torch.device("cpu")
    return picked


def _cut(text: str, until: list[str]) -> str:
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


@register_model("mmdlm")
class MMDLMEvalModel(TemplateLM):
    """lm-eval model over a pipeline folder. Model arguments (`--model_args k=v,...`): pretrained (the
    folder), mc_samples (ELBO mask draws per request, 32), estimator ("tokens" or "time"), batch_size
    (rows per forward: mask draws, or prompts when generating), gen_length (128), steps, block_length,
    threshold, temperature (0), remasking, cache, seed (0), device ("cuda" when available), dtype
    ("float32", "bfloat16", "float16"), max_length (default: the model's max_position_embeddings)."""

    def __init__(self, pretrained: str, mc_samples: int = 32, estimator: str = "tokens", batch_size=16,
                 gen_length: int = 128, steps: int | None = None, block_length: int | None = None,
                 threshold: float | None = None, temperature: float = 0.0, remasking: str | None = None,
                 cache: str | None = None, seed: int = 0, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, max_batch_size=None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"model argument estimator={estimator!r} must be one of {ESTIMATORS}")
        if dtype not in DTYPES:
            raise ValueError(f"model argument dtype={dtype!r} must be one of {sorted(DTYPES)}")
        self.mc_samples = _count("mc_samples", mc_samples)
        # lm-eval's --batch_size may be "auto": it means the default here (no memory probing)
        self.batch_size = 16 if str(batch_size).startswith("auto") else _count("batch_size", batch_size)
        self.gen_length = _count("gen_length", gen_length)
        self.steps, self.block_length = _count("steps", steps, True), _count("block_length", block_length, True)
        self.threshold = None if threshold is None else float(threshold)
        self.temperature = float(temperature)
        self.remasking, self.cache, self.estimator, self.seed = remasking, cache, estimator, int(seed)
        self._device = _pick_device(device)
        self.pipe = TextDiffusionPipeline.from_pretrained(pretrained).to(self._device)
        if DTYPES[dtype] != self.pipe.model.dtype:
            self.pipe.model.to(DTYPES[dtype])
        self.pipe.model.eval()
        self.pipe.set_progress_bar_config(disable=True)
        self.tokenizer = self.pipe.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"the pipeline in {pretrained!r} has no tokenizer; lm-eval needs text in and out")
        config = self.model.config
        self.max_length = _count("max_length", max_length or config.max_position_embeddings)
        self.layout = getattr(config, "attention_layout", "bidirectional")
        self.mask_token_id = self.tokenizer.mask_token_id

    @property
    def model(self):
        return self.pipe.model

    # ---- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Prompts are encoded without special tokens everywhere in the project (pipelines.base.encode_prompts).
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "mmdlm").replace("/", "__")

    # ---- scores ---------------------------------------------------------------------------------
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        if len(continuation) > self.max_length - (self.layout == "causal"):
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}")
        context = context[max(0, len(context) + len(continuation) - self.max_length):]  # drop the oldest context
        if self.layout == "causal":
            score = causal_loglikelihood(self.model, context or [self.eot_token_id], continuation)
        else:
            score = diffusion_loglikelihood(
                self.model, context, continuation, self.mask_token_id, num_samples=self.mc_samples,
                estimator="time" if self.layout == "block_causal" else self.estimator, batch_size=self.batch_size,
                generator=request_generator(self.seed, context, continuation),
            )
        return score.loglikelihood, score.is_greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in requests:
            result = self._score(list(context), list(continuation))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in [req.args for req in requests]:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ))
            total = sum(self._score(list(ctx), list(cont))[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    # ---- generation -----------------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int | None, float]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = kwargs.pop("max_gen_toks", None)
        temperature = float(kwargs.pop("temperature", self.temperature))
        if kwargs.pop("do_sample", True) is False:
            temperature = 0.0
        return until, None if max_tokens is None else int(max_tokens), temperature

    def _prompt_batch(self, contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask, each prompt cut to its newest tokens so that gen_length fits."""
        room = self.max_length - self.gen_length
        if room < 1:
            raise ValueError(f"gen_length={self.gen_length} leaves no room for a prompt in max_length={self.max_length}")
        rows = [self.tok_encode(c)[-room:] or [self.eot_token_id] for c in contexts]
        width = max(len(r) for r in rows)
        pad = self.pipe.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # rows of one call share their settings
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        generator = torch.Generator().manual_seed(self.seed)
        for index in groups.values():
            until, max_tokens, temperature = self._gen_settings(requests[index[0]].args[1])
            for lo in range(0, len(index), self.batch_size):
                rows = index[lo : lo + self.batch_size]
                ids, mask = self._prompt_batch([requests[i].args[0] for i in rows])
                out = self.pipe(
                    input_ids=ids, attention_mask=mask, gen_length=self.gen_length, block_length=self.block_length,
                    steps=self.steps, threshold=self.threshold, temperature=temperature, remasking=self.remasking,
                    cache=self.cache, generator=generator, output_type="ids",
                )
                generated = out.sequences[:, ids.shape[1] :]
                if max_tokens is not None:
                    generated = generated[:, :max_tokens]
                for i, text in zip(rows, self.pipe.decode(generated), strict=True):
                    results[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results
