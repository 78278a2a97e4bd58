"""The REPL through a real terminal (pexpect): a streamed answer, settings, stats, Ctrl-C, quit."""

from __future__ import annotations

import sys
import time

import pexpect

from ranks import MPIRUN, ROOT


def test_repl_streams_answers_and_survives_ctrl_c(tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("The secret word is banana. ")
    repl = pexpect.spawn(
        MPIRUN,
        [
            "-n",
            "2",
            sys.executable,
            "-m",
            "mnemosyne_hpc.repl",
            "parallel.kvp=2",
            "scheduler.chunking=fixed",
            "scheduler.priority=fcfs",
            "cache.max_model_len=2048",
            "parallel.timeout_s=30",
        ],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=180,
    )
    try:
        repl.expect("REPL")
        repl.expect("> ")
        repl.sendline("/set max_tokens 8")
        repl.expect("'max_tokens': 8")
        repl.sendline("/set temperature -1")
        repl.expect("temperature must be a number >= 0")
        repl.sendline("The capital of France is")
        repl.expect(r"Paris.*\[TTFT \d+ ms, TBT median [\d.]+ ms, 8 tokens, length\]")

        repl.sendline("/set max_tokens 1500")
        repl.expect("> ")
        repl.sendline("/set ignore_eos true")
        repl.expect("'ignore_eos': True")
        repl.sendline("Once upon a time")
        repl.expect_exact("Once upon a time\r\n")  # the terminal's echo
        time.sleep(2)  # the answer is streaming
        repl.sendintr()  # Ctrl-C: cancels this answer, not the job
        repl.expect(r"\[TTFT \d+ ms, TBT median [\d.]+ ms, (\d+) tokens, abort\]")
        assert int(repl.match.group(1)) < 1500

        repl.sendline("/load " + str(context))
        repl.expect(r"loaded 27 characters \(\d+ tokens\)")
        repl.sendline("/reset")
        repl.expect("reset")
        repl.sendline("/load " + str(context))
        repl.expect("loaded")
        repl.sendline("/set max_tokens 4")
        repl.expect("> ")
        repl.sendline("/set ignore_eos true")
        repl.expect("> ")
        repl.sendline("What is the secret word?")
        repl.expect(r"\[TTFT \d+ ms.*4 tokens, length\]")
        repl.sendline("/stats")
        repl.expect(r"answers: 3; TTFT median \d+ ms; TBT median [\d.]+ ms")
        repl.expect(
            r"engine: 0 running, 0 waiting, KV blocks 0/\d+; "
            r"sampling \{'max_tokens': 4, 'ignore_eos': True\}; context 27"
        )
        repl.sendline("/quit")
        repl.expect(pexpect.EOF)
    finally:
        repl.close()
    assert repl.exitstatus == 0, repl.before


def test_a_loaded_context_is_prefilled_once_for_every_question_after_it(tmp_path):
    """/load a 3,000-token document and ask twice: the second answer reuses the document's cached KV
    (all but its last, partial, block), so its first token comes in a small fraction of the time."""
    context = tmp_path / "context.txt"
    context.write_text(
        " ".join(
            f"Item {i} of the inventory is a {('red', 'green', 'blue')[i % 3]} box of {i % 17} marbles."
            for i in range(250)
        )
        + "\n"
    )
    repl = pexpect.spawn(
        sys.executable,
        ["-m", "mnemosyne_hpc.repl", "scheduler.chunking=fixed", "scheduler.chunk_size=1024"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=300,
    )
    try:
        repl.expect("> ")
        repl.sendline("/load " + str(context))
        repl.expect(r"loaded \d+ characters \((\d+) tokens\)")
        assert int(repl.match.group(1)) > 3000
        repl.sendline("/set max_tokens 2")
        repl.expect("> ")
        answers = []
        for question in ("What colour is item 7?", "What colour is item 8?"):
            repl.sendline(question)
            repl.expect(r"\[TTFT (\d+) ms.*\] prompt (\d+) tokens, (\d+) of them cached")
            answers.append([int(group) for group in repl.match.groups()])
        (first_ttft, prompt, first_cached), (second_ttft, _, second_cached) = answers
        assert first_cached == 0 and second_cached >= prompt - 128 - 16  # all but the last block and the question
        assert second_ttft < 0.25 * first_ttft, answers
        repl.sendline("/clear-cache")
        repl.expect("prefix cache cleared")
        repl.sendline("What colour is item 9?")
        repl.expect(r"\] prompt \d+ tokens, 0 of them cached")
        repl.sendline("/quit")
        repl.expect(pexpect.EOF)
    finally:
        repl.close()
    assert repl.exitstatus == 0, repl.before
