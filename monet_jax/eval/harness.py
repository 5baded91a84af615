"""EleutherAI lm-evaluation-harness adapter: ``lm_eval --model monet_jax`` for any task whose data is local.

    monet-lm-eval --model monet_jax --model_args pretrained=runs/default/checkpoint,batch_size=8 \\
        --tasks my_task --include_path my_tasks/
    python -m monet_jax.eval.harness ...        # the same

lm-eval 0.4.13 finds models only in its own registry (no entry-point plugins), so ``lm_eval`` itself never
sees this one; ``monet-lm-eval`` imports this module, which registers ``monet_jax``, and then runs lm-eval's
own command line unchanged. Model args: ``pretrained`` (our checkpoint or a Hugging Face directory),
``tokenizer`` (default: the checkpoint's own; ``byte``, a tokenizer.json or a tokenizer.model), ``batch_size``
(wins over ``--batch_size``),
``max_gen_toks``, ``mask`` (an expert-deletion mask file) and ``dtype`` (parameters and computation; default:
float32 on a CPU, bfloat16 on TPU and GPU). lm-eval is an optional dependency: only this
module imports it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from monet_jax.eval import tasks
from monet_jax.eval.generate import Sampling, generate

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@register_model("monet_jax")
class MonetLM(LM):
    """Scores with :func:`tasks.loglikelihoods` and decodes with :func:`generate.generate`, so lm-eval numbers
    come from the same code as ``eval.py tasks`` and ``eval.py generate``."""

    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str | None = None,
                 max_gen_toks: int = 256, mask: str | None = None, dtype: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        from monet_jax import MonetForCausalLM
        from monet_jax.convert.hf import read_config
        from monet_jax.data.tokenizer_files import tokenizer_for_checkpoint

        if unknown:
            raise ValueError(f"monet_jax: unknown model_args {sorted(unknown)} (known: pretrained, tokenizer, "
                             "batch_size, max_gen_toks, mask, dtype)")
        if not pretrained:
            raise ValueError("monet_jax: model_args needs pretrained=PATH (a checkpoint directory)")
        # device and max_batch_size come from lm-eval's CLI defaults (cuda:0, None); JAX picks its own devices.
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.tok = tokenizer_for_checkpoint(pretrained, None if tokenizer is None else str(tokenizer),
                                            vocab_size=read_config(pretrained).vocab_size,
                                            flag="tokenizer=PATH in --model_args")
        print(f"tokenizer: {self.tok.source}", flush=True)
        self.model = MonetForCausalLM.from_pretrained(pretrained, dtype=dtype)
        self._chat = False  # set once lm-eval renders a chat: contexts then hold the template's special tokens
        if mask is not None:
            if not Path(str(mask)).is_file():
                raise ValueError(f"monet_jax: expert mask file not found: {mask}")
            from monet_jax.experts.mask import ExpertMask, apply_mask  # written alongside; imported only when used

            apply_mask(self.model, ExpertMask.load(str(mask)))
        self.model.eval()
        self.max_length = int(self.model.config.max_position_embeddings)
        self._progress = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval always passes its CLI ``--batch_size`` (default 1) besides ``model_args``; a key given in
        ``model_args`` wins instead of colliding."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def _context_ids(self, text: str) -> list[int]:
        """bos + the context, as :func:`tasks.loglikelihoods` frames it; a rendered chat's special tokens are
        their ids, and a template that wrote bos itself gets no second one (as lm-eval's HFLM does)."""
        if not self._chat:
            return [self.tok.bos_id, *map(int, self.tok.encode(text))]
        ids = self.tok.encode_with_specials(text)
        return ids if ids[:1] == [self.tok.bos_id] else [self.tok.bos_id, *ids]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        if not pairs:
            return []
        tokenized = []
        for context, continuation in pairs:
            cont = [int(t) for t in self.tok.encode(continuation)]
            if not cont:
                raise ValueError(f"empty continuation after tokenization: {continuation!r}")
            tokenized.append((self._context_ids(context), cont))
        scores, greedy = tasks.token_loglikelihoods(self.model, tokenized, pad_id=self.tok.pad_id,
                                                    batch_size=self.batch_size, progress=not disable_tqdm,
                                                    return_greedy=True)
        out = [(float(s), bool(g)) for s, g in zip(scores, greedy, strict=True)]
        for pair, res in zip(pairs, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """``log p(document)`` from bos, every token scored once: the document is cut into windows of
        ``max_position_embeddings`` predicted tokens; the first is conditioned on bos, each later one on the
        ``max_position_embeddings`` tokens before it (a full context), and the context ends where the
        predicted tokens start (``make_disjoint_window``), so nothing is counted twice."""
        pairs, owner = [], []
        for k, r in enumerate(requests):
            (text,) = r.args
            ids = [int(t) for t in self.tok.encode(text)]
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=self.tok.bos_id, max_seq_len=self.max_length, context_len=1)):
                pairs.append((ctx, pred))
                owner.append(k)
        totals = np.zeros(len(requests), np.float64)
        if pairs:
            scores = tasks.token_loglikelihoods(self.model, pairs, pad_id=self.tok.pad_id, batch_size=self.batch_size,
                                                max_len=self.max_length, progress=not disable_tqdm)
            np.add.at(totals, np.array(owner), scores)
        out = [float(t) for t in totals]
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks for sampling (``do_sample``/``temperature``). The cache decoder has no
        stop-string hook, so each batch decodes ``max_gen_toks`` (or to eos) and the text is cut before the
        first ``until`` string afterwards."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        parsed = []
        for k, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if kwargs.pop("do_sample", None) is False:
                temperature = 0.0
            sampling = Sampling(temperature, int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0))
            seed = int(kwargs.pop("seed", 0) or 0)
            if kwargs:
                log.warning("monet_jax: ignoring generation arguments %s", sorted(kwargs))
            ids = self._context_ids(context)[-(self.max_length - new):]
            parsed.append((ids, until))
            groups.setdefault((new, sampling, seed), []).append(k)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (new, sampling, seed), members in groups.items():
            members = sorted(members, key=lambda k: -len(parsed[k][0]))  # similar prompt lengths share a batch
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                res = generate(self.model, [parsed[k][0] for k in batch], max_new_tokens=new, eos_id=self.tok.eos_ids,
                               pad_id=self.tok.pad_id, sampling=sampling, seed=seed)
                for k, toks in zip(batch, res["tokens"], strict=True):
                    text = cut_at_stop(self.tok.decode(toks), parsed[k][1])
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", tuple(requests[k].args), text)
                bar.update(len(batch))
        bar.close()
        return out

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request cache keys (as HFLM: its path, slashes replaced)."""
        return str(self.tok.path or "byte").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The checkpoint's chat template for ``--apply_chat_template`` (a template name is not supported: a
        checkpoint holds one)."""
        if not chat_template:
            return None
        if not self.tok.chat_template:
            raise ValueError(f"monet_jax: the tokenizer {self.tok.describe()} has no chat_template: leave out "
                             "--apply_chat_template")
        if isinstance(chat_template, str):
            log.warning("monet_jax: the checkpoint has one chat template; ignoring the name %r", chat_template)
        return self.tok.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The messages rendered with the checkpoint's chat template (:func:`monet_jax.data.chat.render_chat`).
        Without a generation prompt the last message is continued: the text ends where its content ends. A
        template that rejects the system role gets the messages without it, as lm-eval's HFLM retries."""
        from monet_jax.data.chat import render_chat

        template = self.chat_template(True)
        self._chat = True
        try:
            text = render_chat(template, chat_history, self.tok.special_tokens,
                               add_generation_prompt=add_generation_prompt)
        except ValueError:
            log.warning("monet_jax: the chat template failed; rendering without the system message")
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = render_chat(template, chat_history, self.tok.special_tokens,
                               add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt:
            final = chat_history[-1]["content"].strip()
            end = text.rfind(final)
            if end < 0:
                raise ValueError("monet_jax: the chat template does not write the last message's content")
            text = text[:end + len(final)]
        return text


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _batch_size(value) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("monet_jax: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"monet_jax: batch_size must be positive, got {value}")
    return size


def main(argv: list[str] | None = None) -> None:
    """``monet-lm-eval``: lm-eval's own command line, with the ``monet_jax`` model registered (importing this
    module registers it; plain ``lm_eval`` has no model plugins, so it never sees it).

    Args:
        argv: The command line without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["--model", "monet_jax", "--model_args", "pretrained=runs/default/checkpoint",
            "--tasks", "my_task", "--include_path", "my_tasks/"]``.

    Raises:
        SystemExit: With status 2 for a bad checkpoint, task or model argument, after one line on
            stderr; lm-eval's own exits otherwise.
    """
    from lm_eval.__main__ import cli_evaluate

    from monet_jax.config import ConfigError
    from monet_jax.convert.readers import ConvertError

    if argv is not None:
        sys.argv = ["monet-lm-eval", *argv]
    try:
        cli_evaluate()
    except (ValueError, ConfigError, ConvertError, OSError) as e:  # a bad checkpoint, task or argument: one line
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"monet-lm-eval: error: {message.removeprefix('monet_jax: ')}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
