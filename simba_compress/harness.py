"""lm-eval integration: a model class registered under the name `simba` (needs `pip install ".[eval]"`).

    lm_eval run --model simba --model_args pretrained=OUT --tasks hellaswag
    # or, from Python:
    lm_eval.simple_evaluate(model="simba", model_args="pretrained=OUT", tasks=["hellaswag"])

lm-eval 0.4 finds model classes only in its own registry and reads no plugins: the installed package ships
a .pth hook (setup.py) that registers `simba` when lm-eval loads its models. An editable install (pip
install -e) lacks that hook; there `python -m simba_compress.harness run ...` runs lm-eval's command line
with this module imported, and `import simba_compress.harness` registers the class for simple_evaluate.

What pruning does to each request type:
- loglikelihood (multiple choice, cloze): the continuation and the last context token (which predicts the
  continuation's first token) are protected and run through every layer; the context before them is
  pruned by the model's schedule, exactly like the headline metric (evaluate.py).
- loglikelihood_rolling (perplexity tasks): only the last token of each window is protected, so every
  position is scored and a pruned position is predicted from the layer where it was dropped.
- generate_until: the prompt is prefilled pruned, then every generated token runs through every layer.

lm-eval's own hf model also runs a compressed folder pruned (`--model hf --model_args
pretrained=OUT,trust_remote_code=True`, hf.py), with the same scores for rolling loglikelihood, generation and
one-token continuations; it cannot say where a longer continuation starts, so there it prunes the continuation
with the context, which this model protects.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  lm-eval's own models (hf, vllm, ...): it reads them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .checkpoints import load, load_tokenizer
from .compress import resolve_device
from .evaluate import protected


class SimbaLM(LM):
    """A simba_compress model (dense checkpoint or compressed folder) for lm-eval."""

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        tokenizer: str | None = None,
        max_length: int = 2048,
        dense: bool = False,
        batch_size: int | str = 1,  # accepted for lm-eval's CLI; requests run one at a time
        **kwargs,
    ) -> None:
        super().__init__()
        dev, dt = resolve_device(str(device), str(dtype))
        model = load(pretrained, dtype=dt, device=dev)
        if str(dense).lower() in ("true", "1"):
            model.simba = None
        self._attach(model, load_tokenizer(pretrained, tokenizer), int(max_length))

    @classmethod
    def wrap(cls, model, tokenizer, max_length: int = 2048) -> "SimbaLM":
        """An lm-eval model around a model already in memory (as `compare` uses it)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self._attach(model, tokenizer, max_length)
        return self

    def _attach(self, model, tokenizer, max_length: int) -> None:
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _logprobs(self, inputs: list[int], protect: int) -> torch.Tensor:
        """Log-probabilities (l, vocab) at every position of `inputs`, the last `protect` positions protected."""
        simba = protected(self.model.simba, min(protect, len(inputs)))
        ids = torch.tensor([inputs], device=self.model.device)
        return self.model(ids, simba=simba).logits[0].float().log_softmax(-1)

    def _score(self, context: list[int], continuation: list[int], protect: int) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        n = len(continuation)
        logprobs = self._logprobs(ids[:-1], protect)[-n:]
        target = torch.tensor(ids[-n:], device=logprobs.device)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return logprobs.gather(1, target[:, None]).sum().item(), greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            context, continuation = req.args
            spaces = len(context) - len(context.rstrip())  # a context's trailing space belongs to the answer
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self._encode(context + continuation)
            ctx = self._encode(context) if context else []
            cont = whole[len(ctx) :] or whole[-1:]
            ctx = whole[: len(whole) - len(cont)] or [self.eot]
            out.append(self._score(ctx, cont, protect=len(cont)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = get_rolling_token_windows(self._encode(text), self.eot, self.max_length, context_len=1)
            total = 0.0
            for ctx, cont in map(make_disjoint_window, windows):
                total += self._score(list(ctx), list(cont), protect=1)[0]
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 256))
            ids = (self._encode(context) or [self.eot])[-max(1, self.max_length - new) :]
            tokens = self.model.generate(
                torch.tensor([ids], device=self.model.device),
                max_new_tokens=new,
                do_sample=bool(kwargs.get("do_sample", False)),
                temperature=float(kwargs.get("temperature", 1.0) or 1.0),
                eos_token_id=self.eot,
            )[0, len(ids) :].tolist()
            text = self.tokenizer.decode([t for t in tokens if t != self.eot])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def _register() -> None:
    """Register `simba` once. The wheel's hook may already hold a lazy placeholder for this class (lm-eval then
    imports this module by name), and a second registration under another class object is an error."""
    from lm_eval.api.registry import model_registry

    if "simba" not in model_registry:
        register_model("simba")(SimbaLM)


def main() -> None:
    """`python -m simba_compress.harness ...`: lm-eval's command line with `simba` registered."""
    import simba_compress.harness  # noqa: F401  the package's module registers, not this `__main__` copy
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
else:
    _register()
