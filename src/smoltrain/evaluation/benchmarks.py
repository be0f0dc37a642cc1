"""Benchmark scores as SmolLM2 is judged, through lm-evaluation-harness (`lm-eval`).

lm-eval owns the tasks, prompts, few-shot sampling and metrics, so the numbers are the
field's; this module is the model side: `SmolLM`, lm-eval's `LM` interface over a
`CustomLLM`, and `evaluate_tasks`, which `smoltrain eval` and the training loop call.

The adapter tokenizes exactly as lm-eval's `hf` model does (so scores match it item by item)
but computes logits only at the continuation's positions (`logits_to_keep`): the 49k-wide
head over every context token is most of what `hf` spends on a multiple-choice item.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from smoltrain.errors import DataError, MissingExtra, TrainingError
from smoltrain.tokenizer import chat_template as template_of
from smoltrain.tokenizer import stop_token_ids

# SmolLM2's zero-shot suite (its model card): lm-eval's names for each benchmark
PRESETS: dict[str, tuple[str, ...]] = {
    "smollm2": (
        "hellaswag",
        "arc_easy",
        "arc_challenge",
        "piqa",
        "mmlu_continuation",  # MMLU in cloze form, as SmolLM2 reports it
        "commonsense_qa",
        "winogrande",
        "openbookqa",
    ),
}


try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the `eval` extra is not installed: require_lm_eval() says so
    TemplateLM = object


def require_lm_eval() -> None:
    if TemplateLM is object:
        raise MissingExtra(
            "benchmarks need lm-evaluation-harness, which is not installed; pip install "
            "'smoltrain[eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
        )


class SmolLM(TemplateLM):
    """lm-eval's `LM` for a `CustomLLM`: batched `loglikelihood` (sorted by length, longest
    first, right-padded: plain causal attention, no mask), `loglikelihood_rolling` and
    greedy `generate_until`. On several processes each rank scores its share (lm-eval deals
    the requests out) and the results are gathered to rank 0."""

    def __init__(
        self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256, amp: Callable | None = None
    ) -> None:
        """`amp`: a context manager factory for each forward (the training loop's autocast)."""
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._amp = amp or contextlib.nullcontext
        self._batch_size, self._max_gen_toks = batch_size, max_gen_toks
        self._chat = False  # set once lm-eval renders a prompt in the chat template
        dist = torch.distributed
        self._dist = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank() if self._dist else 0
        self._world = dist.get_world_size() if self._dist else 1

    # -------------------------------------------------------------- what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # an empty context is conditioned on BOS (else EOS), as lm-eval's hf model does
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "smoltrain")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from lm_eval.models.utils import has_bos_prefix

        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # lm-eval's --apply_chat_template: prompts rendered as a conversation for chat models
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return template_of(self.tokenizer) if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        self._chat = True  # replies then end at the template's end of turn too
        return self.tokenizer.apply_chat_template(
            chat_history,
            chat_template=template_of(self.tokenizer),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    # -------------------------------------------------------------- distributed hooks
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._dist:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if not self._dist:
            return [obj]
        out = [None] * self._world if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._dist:
            torch.distributed.barrier()

    # ------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        from lm_eval.models.utils import Collator
        from tqdm.auto import tqdm

        # longest first (padding stays small, a too-large batch fails at once); requests that
        # differ only in a one-token continuation share one forward (multiple choice)
        order = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts" if self._world == 1 else None,  # ranks keep equal batch counts
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="loglikelihood")
        for chunk in order.get_batched(n=override_bs or self._batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            lengths = [len(r) for r in rows]
            padded = max(lengths)
            first_scored = min(n - len(cont) for n, (_, _, cont) in zip(lengths, chunk, strict=True))
            keep = padded - first_scored
            ids = torch.zeros(len(rows), padded, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
            with self._amp():
                logits = self.model(ids.to(self.device), logits_to_keep=keep).logits
            # scored on the device: the host gets two numbers a request, not (B, keep, V) fp32
            logprobs = F.log_softmax(logits.float(), dim=-1)
            scores, cached = [], []
            for (request, ctx, cont), n, row_logprobs in zip(chunk, lengths, logprobs, strict=True):
                start = n - len(cont) - (padded - keep)
                scored = row_logprobs[start : start + len(cont)][None]  # (1, cont, V)
                greedy = scored.argmax(dim=-1)
                for req, cont_toks, lp in order.get_cache(
                    req_str=request, cxt_toks=ctx, cont_toks=cont, logits=scored
                ):
                    target = torch.tensor(cont_toks, dtype=torch.long, device=lp.device)[None]
                    is_greedy = (greedy[:, -target.shape[1] :] == target).all()
                    scores.append(
                        torch.stack([torch.gather(lp, 2, target[..., None]).sum(), is_greedy.float()])
                    )
                    cached.append(req)
            for req, (logprob, is_greedy) in zip(cached, torch.stack(scores).tolist(), strict=True):
                answer = (logprob, bool(is_greedy))
                results.append(answer)
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in windows of the model's context (perplexity tasks)."""
        from lm_eval import utils

        windows, counts = [], []
        for (text,) in [r.args for r in requests]:
            parts = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows += parts
            counts.append(len(parts))
        pad = 0
        if self._world > 1:  # every rank runs as many forwards
            totals = self.all_gather(torch.tensor(len(windows), device=self.device)).tolist()
            pad = max(totals) - len(windows)
            windows += [windows[0]] * pad
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        scores = scores[: len(scores) - pad]
        out, at = [], 0
        for request, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[at : at + n])
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
            at += n
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (`until`), batched with left
        padding; sampling settings of a task are refused rather than silently ignored."""
        from torch.distributed.fsdp import FSDPModule

        from smoltrain.generate import generate

        if isinstance(self.model, FSDPModule):  # ranks would stop decoding at different steps
            raise TrainingError(
                "generate_until tasks cannot run on a sharded (train.fsdp) model in the loop; score "
                "them after training with smoltrain eval on final/ or a checkpoint"
            )
        out = [""] * len(requests)
        stops = stop_token_ids(self.eot_token_id, self.tokenizer, chat=self._chat)
        order = sorted(range(len(requests)), key=lambda i: -len(self.tok_encode(requests[i].args[0])))
        for b in range(0, len(order), self._batch_size):
            batch = order[b : b + self._batch_size]
            kwargs = [dict(requests[i].args[1]) for i in batch]
            for k in kwargs:
                if k.get("do_sample") or (k.get("temperature") or 0) > 0:
                    raise ValueError(f"generate_until with sampling ({k}) is not supported; greedy only")
            max_new = max(k.get("max_gen_toks", self._max_gen_toks) for k in kwargs)
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
            with self._amp():
                tokens = generate(
                    self.model,
                    ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new,
                    eos_token_id=stops,
                    pad_token_id=self.eot_token_id,
                )[:, width:].tolist()
            for row, i in enumerate(batch):
                new = [t for t in tokens[row][: kwargs[row].get("max_gen_toks", self._max_gen_toks)]]
                new = new[: next((at for at, t in enumerate(new) if t in stops), len(new))]
                text = self.tok_decode(new)
                until = kwargs[row].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


# ------------------------------------------------------------------------- running


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None):
    """lm-eval's index of tasks (its own and those under include_path), built once per
    process: indexing the few thousand task YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def expand_tasks(names: list[str], manager) -> list[str]:
    """Presets (`smollm2`) expanded; an unknown name is an error naming the closest ones."""
    tasks = []
    for name in names:
        if name in PRESETS:
            tasks += PRESETS[name]
            continue
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks + list(PRESETS), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown task '{name}'{hint} (lm-eval's task names, a preset such as 'smollm2', or "
                "tasks of your own with --include-path DIR)"
            )
        tasks.append(name)
    return tasks


def check_tasks(tasks: list[str], include_path: str | None) -> list[str]:
    """lm-eval installed, the include path a folder, every task known: before any work."""
    from pathlib import Path

    require_lm_eval()
    if not tasks:
        raise ValueError(
            "no tasks given; name lm-eval tasks, e.g. hellaswag,arc_easy (or the preset smollm2)"
        )
    if include_path and not Path(include_path).is_dir():
        raise ValueError(f"include path '{include_path}' is not a folder of lm-eval task YAMLs")
    manager = task_manager(include_path)
    names = expand_tasks(tasks, manager)
    if ifeval := [t for t in names if _scored_like_ifeval(manager, t)]:
        require_ifeval_data(ifeval)
    return names


def _scored_like_ifeval(manager, task: str) -> bool:
    """lm-eval's IFEval, or a local copy that includes it: scored by its instruction checkers."""
    entry = manager.task_index.get(task)
    return "ifeval" in str(((entry.cfg if entry is not None else None) or {}).get("process_results", ""))


def require_ifeval_data(tasks: list[str]) -> None:
    """IFEval's checkers need langdetect, immutabledict and nltk, and nltk's `punkt_tab`
    sentence splitter, which lm-eval would download at import: checked here, before any
    work, and fetched only when online (HF_HUB_OFFLINE unset)."""
    import importlib.util
    import os
    import socket

    from huggingface_hub import constants as hub_constants

    if missing := [m for m in ("langdetect", "immutabledict", "nltk") if not importlib.util.find_spec(m)]:
        raise MissingExtra(
            f"{', '.join(tasks)} need(s) {', '.join(missing)} (IFEval's instruction checkers), "
            "which are not installed; pip install 'smoltrain[eval]' (or 'lm-eval[ifeval]')"
        )
    import nltk

    def found() -> bool:
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            return True
        except LookupError:
            return False

    # the hub's own true values, read now (its HF_HUB_OFFLINE constant is read at its import)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in hub_constants.ENV_VARS_TRUE_VALUES
    if not found() and not offline:
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # an unreachable server fails in seconds, not minutes
        try:
            nltk.download("punkt_tab", quiet=True, raise_on_error=False)
        finally:
            socket.setdefaulttimeout(timeout)
    if not found():
        raise DataError(
            f"{', '.join(tasks)} count(s) sentences with nltk's punkt_tab data, which is not on this "
            f"machine (searched: {', '.join(nltk.data.path[:3])} ...) and could not be downloaded; "
            "on a machine with network run `python -m nltk.downloader -d DIR punkt_tab`, copy DIR "
            "here and set NLTK_DATA=DIR"
        )


def _unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        s in text
        for s in (
            "offline",
            "connection",
            "couldn't reach",
            "resolve",
            "not found on the hub",
            "datasetnotfound",
        )
    )


def evaluate_tasks(
    lm: SmolLM,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    quiet: bool = False,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
) -> dict[str, Any] | None:
    """lm-eval's `simple_evaluate` on our model, with its default seeds: its results dict
    (rank 0; None elsewhere). `apply_chat_template`: each prompt (its few-shot examples as
    turns) in the model's chat template, after `system_instruction`, as chat models are scored."""
    import datasets
    from lm_eval import simple_evaluate

    if quiet:  # inside the training loop: the scores line says it all
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    manager = task_manager(include_path)
    names = expand_tasks(tasks, manager)
    if limit is not None and limit >= 1:  # lm-eval reads a float as a fraction of each task
        limit = int(limit)
    try:
        return simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template and num_fewshot != 0,
            system_instruction=system_instruction,
            bootstrap_iters=0 if quiet else 100_000,  # lm-eval's default: the same stderr
            verbosity="ERROR" if quiet else None,
        )
    except Exception as e:  # datasets raise many types when the hub is out of reach
        if not _unreachable(e):
            raise
        datasets = sorted({_dataset_of(manager, t) for t in names})
        raise ValueError(
            f"the datasets of {', '.join(names)} ({', '.join(datasets)}) cannot be reached "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); connect to the Hugging Face hub, "
            "or give local copies as task YAMLs with --include-path DIR (dataset_path: json, "
            "dataset_kwargs: data_files)"
        ) from None


def _dataset_of(manager, task: str) -> str:
    entry = manager.task_index.get(task)
    path = (entry.cfg or {}).get("dataset_path") if entry is not None else None
    return str(path) if path else f"{task}'s datasets"  # a group: its tasks' datasets


def write_results(results: dict[str, Any], path) -> None:
    """lm-eval's results JSON (results[task]["acc,none"], ...), written atomically."""
    import json

    from lm_eval.utils import handle_non_serializable

    from smoltrain.atomic import write_atomic

    write_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")


def scores(results: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> value for every task and metric (stderr left out), as metrics.jsonl
    and the trackers log them: {"hellaswag/acc_norm": 0.41, ...}."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if (
                metric in ("alias", "sample_len")
                or metric.endswith("_stderr")
                or not isinstance(value, (int, float))
            ):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            flat[f"{task}/{metric}" + ("" if flt in ("none", "") else f"_{flt}")] = float(value)
    return flat
