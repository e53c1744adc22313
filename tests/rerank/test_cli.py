"""``backbone rerank QUERY DOC...`` against a real server (the sync CLI runs in a thread)."""

from __future__ import annotations

import asyncio
import io
import json

from clients.cli import main

QUERY = "what is the capital of france"
PARIS = "Paris is the capital and most populous city of France."
BANANA = "Bananas are an edible fruit produced by large herbaceous flowering plants."


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_rerank_prints_documents_best_first(maxsim_server, capsys):
    code = await run_cli("rerank", QUERY, BANANA, PARIS, "--address", maxsim_server.address)
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(rank, index, doc) for rank, _, index, doc in lines] == [("1", "1", PARIS), ("2", "0", BANANA)]
    assert float(lines[0][1]) > float(lines[1][1])


async def test_rerank_json_top_n_and_stdin(maxsim_server, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{BANANA}\n{PARIS}\n"))
    code = await run_cli("rerank", QUERY, "-", "--top-n", "1", "--format", "json",
                         "--address", maxsim_server.address)
    out, _ = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 1
    assert rows[0]["index"] == 1 and rows[0]["document"] == PARIS and rows[0]["rank"] == 1


async def test_rerank_bad_input_is_one_line_exit_1(maxsim_server, capsys):
    code = await run_cli("rerank", QUERY, PARIS, "--top-n", "5", "--address", maxsim_server.address)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("backbone rerank: INVALID_ARGUMENT INVALID_TOP_K: ")
    assert err.count("\n") == 1
