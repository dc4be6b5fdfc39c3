"""How well could any Token Filtering score do on SmolLM2-135M? Hindsight selections as a bound.

Token Filtering (``latentkv/token_filter.py``) decides online, from a token's key and value, to drop
its attention output in the filtered layers. ``smollm2_token_filter.py`` found it no better than
random on this model. This measures what a selection that *sees the attention output it drops*
reaches at the same skip fractions, layers and warm-up. It is a bound by a local criterion, not a
proof: an online score that meets issue 13's targets (25% of the tokens within 1.05x of dense)
would have to choose better than a choice that sees each layer's outputs, which the KV-similarity
score, blind to them, is far from doing (it chooses like random on this model).

Selections, per filtered layer and window, among the tokens after the warm-up:
* ``smallest output``: drop the outputs that move the residual stream least (||a_t|| / ||x_t||,
  the attention output against the layer's input stream) -- the issue's reading (output zeroed);
* ``closest to previous``: replace the outputs closest to the previous token's by the last kept
  token's output -- a second reading ("reuse"), which no implementation here serves.
Beside them, random dropping and dense, on the source model (every layer kept).

    python benchmarks/smollm2_token_filter_bound.py    # -> results/smollm2_token_filter_bound.md (~2 min, 2 cores)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from smollm2_token_filter import PROMPTS, RESULTS, Scorer, converted
from latentkv.token_filter import TokenFilterOptions

SETTINGS = TokenFilterOptions(skip_fraction=0.25)  # the layers and warm-up of Token Filtering's defaults


def hindsight(layer: torch.nn.Module, index: int, selection: str, fraction: float, warmup: int) -> list:
    """Hooks on decoder layer ``index`` that drop ``fraction`` of its tokens' attention outputs by ``selection``."""
    stream = {}

    def remember_input(_module, args):
        stream["x"] = args[0]

    def drop(_module, _args, a):
        x, T = stream["x"], a.shape[1]
        if selection == "smallest output":
            cost = a.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)
        elif selection == "closest to previous":
            cost = torch.full(a.shape[:2], float("inf"), device=a.device)
            cost[:, 1:] = (a[:, 1:] - a[:, :-1]).norm(dim=-1) / a[:, 1:].norm(dim=-1).clamp_min(1e-6)
        else:  # random
            cost = torch.rand(a.shape[:2], generator=torch.Generator().manual_seed(index)).to(a.device)  # per layer, same draw on any device
        cost[:, :warmup] = float("inf")
        tau = torch.quantile(cost[:, warmup:], fraction, dim=1, keepdim=True)
        keep = cost > tau
        if selection == "closest to previous":  # reuse the last kept token's output
            last = torch.where(keep, torch.arange(T, device=a.device), 0).cummax(dim=1).values
            return torch.gather(a, 1, last[..., None].expand_as(a))
        return a * keep[..., None]

    return [layer.register_forward_pre_hook(remember_input), layer.self_attn.register_forward_hook(drop)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--workdir", default="smollm2-token-filter-work")
    p.add_argument("--out", type=Path, default=RESULTS / "smollm2_token_filter_bound.md")
    a = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    scorer = Scorer(converted("source", Path(a.workdir)), a.windows, a.prompts)
    layers = scorer.model.model.layers
    filtered = sorted(SETTINGS.filtered_layers(len(layers)))
    dense = scorer.score(None)
    rows = [("dense", "", dense)]
    for fraction in (0.25, 0.5):
        for selection in ("random", "smallest output", "closest to previous"):
            hooks = [h for i in filtered for h in hindsight(layers[i], i, selection, fraction, SETTINGS.warmup)]
            rows.append((selection, f"{fraction:.0%}", scorer.score(None)))
            for h in hooks:
                h.remove()
            print(rows[-1], flush=True)
    lines = [
        "# Token Filtering on SmolLM2-135M: what a hindsight selection reaches",
        "",
        f"Written by `benchmarks/smollm2_token_filter_bound.py --windows {a.windows} --prompts {a.prompts}` in "
        f"{time.perf_counter() - t0:.0f} s (2 CPU cores). The source model; layers {filtered[0]}-{filtered[-1]} "
        f"(Token Filtering's default, the later half) after a {SETTINGS.warmup}-token warm-up; WikiText-2 test, "
        f"{a.windows} windows of 1024 tokens, and greedy agreement on {a.prompts} chat prompts, as in "
        "`smollm2_token_filter.md`. Each selection sees the attention output it drops (see the script).",
        "",
        "| selection | dropped | perplexity | x dense | agreement |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {fraction} | {r['perplexity']:.3f} | {r['perplexity'] / dense['perplexity']:.3f} | "
              f"{r['agreement']:.3f} |" for name, fraction, r in rows]
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
