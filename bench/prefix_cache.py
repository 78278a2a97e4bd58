"""Prefix caching: one long document, then questions about it one after another, with the prefix cache
on and off, at KVP=1 (one rank) and KVP=2 (two ranks), side by side in one run. With the cache on, the
first question prefills the document; every later one finds its complete blocks cached.

    .venv/bin/python bench/prefix_cache.py --tokens 65536 --questions 5

Then the same through the OpenAI server: a chat of --chat-turns turns after a --chat-history-token system
message, streamed, with the cache on and off (a random model with the embedded model's tokenizer).

Writes bench/results/prefix_cache_<tokens>tok.json: each question's TTFT and cached tokens per run,
the ratios TTFT of questions 2.. over question 1 (cache on) and cache on over off, and each chat
turn's TTFT with the ratio of the last turn's, cache on over off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import (
    ROOT,
    llama,
    long_prompt_overrides,
    mpirun,
    random_llama,
    random_prompt,
    run_checked,
    run_in_process,
    write_results,
)

MODEL = llama(2, 256, 512, 4, 4, 64, vocab=1024, positions=1 << 20, rope_theta=1e7)


def ask_in_turn(spec: dict) -> list[dict]:
    """Rank 0: each request once the one before it finished; its TTFT and cached tokens."""
    answers = []

    def leader(engine) -> None:
        for request in spec["requests"]:
            engine.add_request(request, {"max_tokens": spec["max_tokens"], "ignore_eos": True})
            while engine.has_unfinished:
                for done in engine.step().finished:
                    answers.append(
                        {
                            "ttft_s": done.ttft_s,
                            "cached_tokens": done.cached_tokens,
                            "prompt_tokens": len(done.prompt_token_ids),
                        }
                    )

    run_in_process(spec["overrides"], leader)
    return answers


def run(ranks: int, spec: dict, workdir: Path) -> list[dict]:
    """`ask_in_turn` on `ranks` ranks under mpirun, one core each."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(spec))
    run_checked([*mpirun(ranks, bind=True), __file__, "--worker", str(spec_path), str(result_path)], threads=1)
    return json.loads(result_path.read_text())


def chat_model(workdir: Path) -> Path:
    """A random 2-layer Llama with a 64k-token window that speaks through the embedded model's tokenizer
    and chat template (its vocabulary, BOS and EOS ids)."""
    from mnemosyne_hpc.config import compose, resolve_cache_dir
    from mnemosyne_hpc.model.gguf import convert_gguf

    cfg = compose([])
    speaker = convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg))
    model_dir = random_llama(
        workdir / "llama-chat-2x256",
        **{**MODEL, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 1 << 16},
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(speaker / name, model_dir / name)
    return model_dir


def chat_turns(model_dir: Path, caching: bool, history_tokens: int, turns: int, workdir: Path) -> list[float]:
    """The OpenAI server (one rank, both cores): a chat of `turns` turns after a system message of about
    `history_tokens` tokens; each turn's TTFT as its client sees it (the first streamed chunk)."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    words = AutoTokenizer.from_pretrained(model_dir).decode(random_prompt(history_tokens, 9, 49152)).split()
    history = " ".join(words)
    address = workdir / f"address-{caching}"
    address.unlink(missing_ok=True)
    overrides = long_prompt_overrides(model_dir, 2 * history_tokens, 4096, 3600, prefix_caching=str(caching).lower())
    command = [*mpirun(1, bind=False), "-m", "mnemosyne_hpc.serve"]
    server = subprocess.Popen([*command, *overrides, "server.port=0", f"server.address_file={address}"], cwd=ROOT)
    try:
        while not (address.exists() and address.read_text().strip()):
            if server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        client = OpenAI(base_url=address.read_text().strip() + "/v1", api_key="none", timeout=3600)
        model = client.models.list().data[0].id
        messages, ttfts = [{"role": "system", "content": history}], []
        for turn in range(turns):
            messages.append({"role": "user", "content": f"What is said in part {turn + 1}?"})
            started, first, reply = time.perf_counter(), None, ""
            for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True):
                first = first or time.perf_counter()
                reply += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            ttfts.append(first - started)
            messages.append({"role": "assistant", "content": reply})
            print(f"  turn {turn + 1}: TTFT {ttfts[-1]:.2f} s", flush=True)
        return ttfts
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="document tokens")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--chat-history", type=int, default=32768, help="system message tokens of the chat")
    parser.add_argument("--chat-turns", type=int, default=10, help="0: no chat through the server")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench/prefix-cache"))
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec_path, result_path = args.worker
        answers = ask_in_turn(json.loads(spec_path.read_text()))
        if answers:  # rank 0
            result_path.write_text(json.dumps(answers))
        return

    model_dir = random_llama(args.workdir.parent / "llama-prefix-2x256", **MODEL)
    document = random_prompt(args.tokens, 0, MODEL["vocab_size"])
    requests = [
        document + random_prompt(args.question_tokens, 1 + i, MODEL["vocab_size"]) for i in range(args.questions)
    ]
    max_model_len = args.tokens + args.question_tokens + 8
    runs = {}
    for kvp in (1, 2):
        for caching in (True, False):
            caching_knob = str(caching).lower()
            overrides = long_prompt_overrides(
                model_dir, max_model_len, args.chunk, 3600, kv_memory_gib=1, prefix_caching=caching_knob
            ) + [f"parallel.kvp={kvp}"]
            name = f"kvp{kvp}_{'cache' if caching else 'nocache'}"
            answers = run(kvp, {"overrides": overrides, "requests": requests, "max_tokens": 2}, args.workdir / name)
            runs[name] = answers
            print(
                f"{name}: TTFT " + ", ".join(f"{a['ttft_s']:.2f} s ({a['cached_tokens']} cached)" for a in answers),
                flush=True,
            )
    ratios = {}
    for kvp in (1, 2):
        cache, nocache = runs[f"kvp{kvp}_cache"], runs[f"kvp{kvp}_nocache"]
        later = statistics.median(a["ttft_s"] for a in cache[1:])
        ratios[f"kvp{kvp} later questions / first, cache on"] = later / cache[0]["ttft_s"]
        ratios[f"kvp{kvp} later questions cache on / off"] = later / statistics.median(a["ttft_s"] for a in nocache[1:])
    chat = {}
    if args.chat_turns:
        model_dir = chat_model(args.workdir.parent)
        for caching in (True, False):
            print(f"chat through the server, prefix caching {caching}:", flush=True)
            name = f"chat_{'cache' if caching else 'nocache'}"
            chat[name] = chat_turns(model_dir, caching, args.chat_history, args.chat_turns, args.workdir)
        ratios[f"chat turn {args.chat_turns} TTFT cache on / off"] = chat["chat_cache"][-1] / chat["chat_nocache"][-1]
    write_results(
        f"prefix_cache_{args.tokens}tok.json",
        {
            "benchmark": "prefix_cache",
            "document_tokens": args.tokens,
            "questions": args.questions,
            "question_tokens": args.question_tokens,
            "chunk_size": args.chunk,
            "model": MODEL,
            "dtype": "bfloat16",
            "cores_per_rank": 1,
            "runs": runs,
            "chat_history_tokens": args.chat_history,
            "chat_ttft_s": chat,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
