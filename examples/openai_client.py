#!/usr/bin/env python3
"""Call a latentkv model served by `vllm serve` (or the Helm chart) with the OpenAI Python client.

    pip install "openai>=1.40"
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --prompt "Once upon a time"

Runs a completion (plain and streamed) and, when the served model has a chat template, a chat
completion. Models without a chat template (base models such as the test model wiki-mha-6M)
are detected and the chat step is skipped: vLLM rejects chat requests for them with HTTP 400.
vLLM does not check the API key unless started with --api-key; the client still needs one.
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import BadRequestError, OpenAI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    p.add_argument("--model", help="served model name (default: first of /v1/models)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")

    # 1. Completion (greedy, so the output is reproducible).
    completion = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0
    )
    print(f"\n[completion] {args.prompt!r} -> {completion.choices[0].text!r}")
    print(f"usage: {completion.usage}")

    # 2. The same completion, streamed token by token.
    print("\n[streamed completion] ", end="", flush=True)
    stream = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
    print()

    # 3. Chat, only if the model has a chat template.
    try:
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": args.prompt}],
            max_tokens=args.max_tokens,
            temperature=0.0,
        )
    except BadRequestError as exc:
        if "chat template" in str(exc).lower():
            print("\n[chat] skipped: the served model has no chat template (a base model); use completions.")
            return 0
        raise
    print(f"\n[chat] {chat.choices[0].message.content!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
