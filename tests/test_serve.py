"""`lmforge serve`: the real `openai` client against servers on free local ports.

Two tiny runs (a base model and its SFT), trained once per session (`tiny_runs`, also used by
the browser test); each server is `python -m lmforge serve RUN --port 0` in a subprocess. The
reference for every answer is `lmforge generate` with the same prompt, budget, temperature and
seed: greedy and seeded answers must be equal, streamed or not.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Its module fixtures are built once: all its tests go to one pytest-xdist worker (make test).
pytestmark = pytest.mark.xdist_group("serve")

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

# ------------------------------------------------------------------------------ shared helpers

TRAIN = ["--model.n_layers=2", "--model.dim=32", "--model.n_heads=2", "--model.context=256",
         "--train.sample_every=0", "--log.plot_every=0", "--train.warmup_passes=0",
         "--train.eval_batches=2", "--train.save_every_minutes=0", "--schedule.warmup_steps=3",
         "--optim.lr=0.01"]  # fmt: skip
# A high learning rate so that 30 + 20 steps leave a model that says something (a model this
# young at lr 3e-4 answers every question with <|end|> at once, which would test little).

STORY = ("It was snowy. Sam lost his blue robot by the well. Lucy came to help. They looked on "
         "the hill. Sam found the blue robot by the well.")  # fmt: skip


def _lmforge(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], check=True,
                   capture_output=True, text=True, timeout=900)  # fmt: skip


def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"base": run, "sft": run}: char tokenizer, 2x32, context 256; built once per session."""
    root = tmp_path_factory.getbasetemp() / "serve-runs"
    runs = {"base": root / "tiny", "sft": root / "tiny-sft"}
    if (root / "done").exists():
        return runs
    data = root / "data"
    _lmforge("prepare", "--builtin", "stories", "--size-mb", "0.3", "--out", data)
    _lmforge("train", f"--data.dir={data}", f"--run.dir={runs['base']}", "--train.batch_size=4",
             "--train.max_steps=30", "--train.eval_every=15", *TRAIN)  # fmt: skip
    _lmforge(
        "sft",
        "--init-from",
        runs["base"],
        f"--run.dir={runs['sft']}",
        f"--sft.data=stories-qa:{data}/qa_train.jsonl",
        "--sft.weights=0.02",
        "--train.max_steps=20",
        "--train.batch_size=8",
        "--train.eval_every=10",
        *TRAIN,
    )
    (root / "done").touch()
    return runs


class Server:
    """`lmforge serve RUN --port 0` in a subprocess; `.url` once it answers /health."""

    def __init__(self, run: Path, log: Path, *extra: str):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", str(run), "--port", "0", "--device",
             "cpu", *extra],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)  # fmt: skip
        self.announced: list[str] = []
        self.url = self._wait_for_url()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"lmforge serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _wait_for_url(self) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                self.announced.append(line.rstrip("\n"))
                if match := re.search(r"chat page: (http://\S+?)/ ", line):
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=120)
        if not found:
            self.stop()
            raise RuntimeError(f"lmforge serve said no address: {self.log.read_text()[-2000:]}")
        return found[0]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def generate_output(run: Path, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                    seed: int | None = None) -> str:  # fmt: skip
    """What `lmforge generate` prints (the CLI's own code, in this process)."""
    from lmforge.cli import main

    args = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens),
            "--temperature", str(temperature), "--device", "cpu"]  # fmt: skip
    if seed is not None:
        args += ["--seed", str(seed)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return out.getvalue()


def reference_answer(run: Path, question: str, max_new_tokens: int, **kw) -> str:
    """`lmforge generate` on an SFT model prints the answer and a newline."""
    text = generate_output(run, question, max_new_tokens, **kw)
    assert text.endswith("\n")
    return text[:-1]


def reference_continuation(run: Path, prompt: str, max_new_tokens: int, **kw) -> str:
    """On a base model it prints the prompt, the continuation and a newline."""
    text = generate_output(run, prompt, max_new_tokens, **kw)
    assert text.startswith(prompt) and text.endswith("\n")
    return text[len(prompt) : -1]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def sft_server(runs, tmp_path_factory):
    server = Server(runs["sft"], tmp_path_factory.mktemp("serve") / "sft.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_server(runs, tmp_path_factory):
    server = Server(runs["base"], tmp_path_factory.mktemp("serve") / "base.log")
    yield server
    server.stop()


def openai_client(server: Server):
    openai = pytest.importorskip("openai")
    # No retries: a 429 or 500 must show, not be retried away.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0,
                         timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def chat(sft_server):
    return openai_client(sft_server)


@pytest.fixture(scope="module")
def base(base_server):
    return openai_client(base_server)


# ------------------------------------------------------------------------------ the happy path


def test_models_lists_the_run_with_its_phase_and_size(chat, base, runs):
    from lmforge.info import count_parameters
    from lmforge.train.checkpoint import load_model

    (model,) = chat.models.list().data
    assert model.id == "tiny-sft" and model.owned_by == "lmforge"
    info = model.model_extra["lmforge"]
    cfg = load_model(runs["sft"])[0].cfg
    assert info["phase"] == "sft" and info["chat"] is True
    assert info["parameters"] == count_parameters(cfg) and info["context"] == 256
    assert f"{count_parameters(cfg):,} parameters" in info["summary"]
    assert chat.models.retrieve("tiny-sft").id == "tiny-sft"
    (base_model,) = base.models.list().data
    assert base_model.id == "tiny" and base_model.model_extra["lmforge"]["phase"] == "pretrain"


def test_health_and_the_startup_lines(sft_server):
    health = sft_server.health()
    assert health["status"] == "ok" and health["model"] == "tiny-sft" and health["phase"] == "sft"
    assert sft_server.url.startswith("http://127.0.0.1:")  # localhost by default
    assert "phase sft" in sft_server.announced[0] and "parameters" in sft_server.announced[0]


def test_chat_greedy_answer_equals_lmforge_generate(chat, runs):
    question = STORY + "\nWho lost the robot?"
    reply = chat.chat.completions.create(
        model="tiny-sft", messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=40)  # fmt: skip
    answer = reply.choices[0].message.content
    assert answer and answer == reference_answer(runs["sft"], question, 40)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    from lmforge.chat_format import Turn, render_prompt
    from lmforge.generate import load_for_generation

    tok = load_for_generation(str(runs["sft"]), "cpu").tokenizer
    assert reply.usage.prompt_tokens == len(render_prompt([Turn("user", question)], tok))
    assert reply.usage.completion_tokens == len(tok.encode(answer))  # char tokenizer
    assert reply.choices[0].finish_reason == ("length" if len(answer) == 40 else "stop")


def test_chat_streamed_token_by_token_equals_seeded_generate(chat, runs):
    question = "What did Sam lose?"
    stream = chat.chat.completions.create(
        model="tiny-sft", messages=[{"role": "user", "content": question}], temperature=1.0,
        seed=7, max_tokens=30, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.content for d in deltas if d.content]
    answer = "".join(pieces)
    assert answer == reference_answer(runs["sft"], question, 30, temperature=1.0, seed=7)
    assert len(pieces) == len(answer) > 1  # one event per token (a char each here)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [reason for reason in finish if reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(answer)
    # The same request without streaming gives the same text.
    whole = chat.chat.completions.create(
        model="tiny-sft", messages=[{"role": "user", "content": question}], temperature=1.0,
        seed=7, max_tokens=30)  # fmt: skip
    assert whole.choices[0].message.content == answer


def test_completions_greedy_equals_lmforge_generate_streamed_or_not(base, runs):
    prompt = "One sunny day, Mia"
    expected = reference_continuation(runs["base"], prompt, 25)
    reply = base.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=25)
    assert reply.choices[0].text == expected and reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 25
    streamed = base.completions.create(model="tiny", prompt=prompt, temperature=0,
                                       max_tokens=25, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_completions_on_the_sft_model_continue_plain_text(chat, runs):
    prompt = "Sam found"
    reply = chat.completions.create(model="tiny-sft", prompt=prompt, temperature=0.8, seed=3,
                                    top_p=0.9, max_tokens=20)  # fmt: skip
    from lmforge.generate import Sampling, load_for_generation, prompt_ids

    loaded = load_for_generation(str(runs["sft"]), "cpu")
    ids = Sampling(20, 0.8, 0, 0.9, 1.0, 3).generate(loaded, prompt_ids(loaded, prompt, False),
                                                     chat=False)  # fmt: skip
    assert reply.choices[0].text == loaded.tokenizer.decode(ids)


def test_system_message_and_history_use_the_sft_template(chat, runs):
    """A system message joins the first user turn (as SFT reads chat JSONL); earlier turns are
    part of the prompt, so the answer equals generate's on the rendered whole."""
    import torch

    from lmforge.chat_format import Turn, render_prompt
    from lmforge.generate import Sampling, load_for_generation

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": STORY + "\nWho helped?"}]},
                {"role": "assistant", "content": "Lucy"},
                {"role": "user", "content": "Where was it found?"}]  # fmt: skip
    reply = chat.chat.completions.create(model="tiny-sft", messages=messages, temperature=0,
                                         max_tokens=15)  # fmt: skip
    loaded = load_for_generation(str(runs["sft"]), "cpu")
    turns = [Turn("user", "Answer briefly.\n\n" + STORY + "\nWho helped?"),
             Turn("assistant", "Lucy"), Turn("user", "Where was it found?")]  # fmt: skip
    with torch.no_grad():
        ids = Sampling(15, 0.0).generate(loaded, render_prompt(turns, loaded.tokenizer), True)
    assert reply.choices[0].message.content == loaded.tokenizer.decode(ids)


def test_stop_strings_end_the_answer_before_them(base, runs):
    prompt = "Lily"
    text = reference_continuation(runs["base"], prompt, 60, temperature=1.0, seed=11)
    # A two-character stop taken from the middle of the reference: the answer is what precedes
    # its first occurrence.
    stop = next(text[i : i + 2] for i in range(5, 50) if text[i : i + 2].strip())
    expected = text[: text.find(stop)]
    for stream in (False, True):
        reply = base.completions.create(
            model="tiny",
            prompt=prompt,
            temperature=1.0,
            seed=11,
            max_tokens=60,
            stop=[stop, "\x00never"],
            stream=stream,
        )
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert (got, finish) == (expected, "stop")


def test_two_concurrent_clients_each_get_their_own_answer(sft_server, runs):
    """Queued, one at a time: each answer equals the one it gets alone."""
    questions = {"a": ("Who lost the robot?", 5), "b": (STORY + "\nWhere was it lost?", 9)}
    answers: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def ask(key: str) -> None:
        try:
            client = openai_client(sft_server)
            question, seed = questions[key]
            start.wait()
            stream = client.chat.completions.create(
                model="tiny-sft", messages=[{"role": "user", "content": question}],
                temperature=1.0, seed=seed, max_tokens=25, stream=True)  # fmt: skip
            answers[key] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    served = sft_server.health()["served"]
    threads = [threading.Thread(target=ask, args=(key,)) for key in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for key, (question, seed) in questions.items():
        assert answers[key] == reference_answer(runs["sft"], question, 25, temperature=1.0,
                                                seed=seed)  # fmt: skip
    assert sft_server.health()["served"] == served + 2


def test_max_tokens_stops_at_the_end_of_the_context(base):
    prompt = "x" * 250  # 250 of the 256 positions
    reply = base.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=100)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------ bad requests

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]

# (what, method, path, JSON body or raw bytes, status, words the message must contain)
# fmt: off
BAD_REQUESTS = [
    ("bad JSON", "POST", CHAT, b'{"messages": [', 400, "not valid JSON"),
    ("a JSON list", "POST", CHAT, b"[1, 2]", 400, "JSON object"),
    ("empty body", "POST", CHAT, b"", 400, "JSON object"),
    ("no messages", "POST", CHAT, {"model": "tiny-sft"}, 400, "'messages' is required"),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "messages"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages.0.role"),
    ("content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("ends with the assistant", "POST", CHAT,
     {"messages": [*HI, {"role": "assistant", "content": "b"}]}, 400, "last message"),
    ("negative max_tokens", "POST", CHAT, {"messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens a string", "POST", CHAT, {"messages": HI, "max_tokens": "5"}, 400,
     "max_tokens"),
    ("temperature 7", "POST", CHAT, {"messages": HI, "temperature": 7}, 400, "temperature"),
    ("temperature NaN", "POST", CHAT,
     b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, "finite"),
    ("top_p 0", "POST", CHAT, {"messages": HI, "top_p": 0}, 400, "top_p"),
    ("repetition_penalty 1e30", "POST", COMPLETIONS, {"prompt": "a", "repetition_penalty": 1e30},
     400, "repetition_penalty"),
    ("stream a string", "POST", CHAT, {"messages": HI, "stream": "yes"}, 400, "stream"),
    ("stop numbers", "POST", CHAT, {"messages": HI, "stop": [1, 2]}, 400, "stop"),
    ("five stop strings", "POST", CHAT, {"messages": HI, "stop": list("abcde")}, 400, "at most 4"),
    ("negative seed", "POST", CHAT, {"messages": HI, "seed": -1}, 400, "seed"),
    ("n = 2", "POST", CHAT, {"messages": HI, "n": 2}, 400, "'n' must be 1"),
    ("unknown model", "POST", CHAT, {"model": "gpt-4o", "messages": HI}, 404, "gpt-4o"),
    ("prompt over the context", "POST", CHAT,
     {"messages": [{"role": "user", "content": "x" * 400}]}, 400, "maximum context length"),
    ("body over 4 MiB", "POST", COMPLETIONS, {"prompt": "x" * (5 << 20)}, 413, "limit"),
    ("token id outside the vocabulary", "POST", COMPLETIONS, {"prompt": [1, 2, 999]}, 400,
     "token id 999"),
    ("two prompts", "POST", COMPLETIONS, {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("no prompt", "POST", COMPLETIONS, {"max_tokens": 3}, 400, "'prompt' is required"),
    ("logprobs", "POST", COMPLETIONS, {"prompt": "a", "logprobs": 2}, 400, "not supported"),
    ("unknown path", "GET", "/v1/engines", None, 404, "no such path"),
    ("GET on a POST path", "GET", CHAT, None, 405, "not allowed"),
]
# fmt: on


@pytest.mark.parametrize(("what", "method", "path", "body", "status", "says"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_a_bad_request_gets_an_openai_shaped_error(sft_server, what, method, path, body, status,
                                                   says):  # fmt: skip
    if isinstance(body, (bytes, type(None))):
        r = httpx.request(method, sft_server.url + path, content=body, timeout=30,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    else:
        r = httpx.request(method, sft_server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and "Traceback" not in r.text
    assert set(error) == {"message", "type", "param", "code"}


def test_chat_on_a_base_model_is_a_clear_400(base):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        base.chat.completions.create(model="tiny", messages=HI)
    assert caught.value.code == "model_not_chat" and "/v1/completions" in caught.value.message


def test_context_overflow_is_named_as_such(chat):
    import openai

    for call in (lambda: chat.chat.completions.create(
                     model="tiny-sft", messages=[{"role": "user", "content": "y" * 300}]),
                 lambda: chat.completions.create(model="tiny-sft", prompt="y" * 256)):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.code == "context_length_exceeded"
        assert "maximum context length is 256 tokens" in caught.value.message


def test_clients_that_leave_mid_answer_stop_their_generation(sft_server, runs):
    before = sft_server.health()
    # Streaming: read the first piece of text, then hang up.
    with httpx.stream("POST", sft_server.url + COMPLETIONS, timeout=30,
                      json={"prompt": "Hi", "max_tokens": 250, "temperature": 0,
                            "stream": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    # Not streaming: give up long before the answer can be done.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sft_server.url + COMPLETIONS, timeout=httpx.Timeout(30, read=0.05),
                   json={"prompt": "Hi", "max_tokens": 250, "temperature": 0})  # fmt: skip
    deadline = time.monotonic() + 10
    while (health := sft_server.health())["cancelled"] < before["cancelled"] + 2:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["served"] == before["served"] and not health["generating"]


def test_the_server_still_answers_well_after_the_bad_requests(chat, sft_server, runs):
    """Runs after the bad requests above (pytest keeps the file's order)."""
    health = sft_server.health()
    assert health["failed"] == 0 and health["waiting"] == 0
    question = "Who found the robot?"
    reply = chat.chat.completions.create(
        model="tiny-sft",
        temperature=0,
        max_tokens=20,
        messages=[{"role": "user", "content": question}],
    )
    assert reply.choices[0].message.content == reference_answer(runs["sft"], question, 20)


# ------------------------------------------------------------------------------ page and CLI


def test_the_page_is_served_with_nothing_from_elsewhere(sft_server):
    r = httpx.get(sft_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)
    assert "/v1/chat/completions" in r.text and 'id="story"' in r.text
    story = httpx.get(sft_server.url + "/story", timeout=10).json()
    assert story["story"] and all(q.endswith("?") for q in story["questions"])


def test_a_port_in_use_is_a_one_line_error(runs, capsys):
    from lmforge.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(runs["base"]), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_stop_strings_are_held_back_until_they_cannot_match():
    """Text that might begin a stop string is not sent until the next token settles it."""
    from lmforge.serve import _Text

    class Letters:  # one character per id
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    text = _Text(Letters(), ["END"])
    sent = [text.add(ord(c)) for c in "abEN"]
    assert sent == ["a", "b", "", ""] and not text.stopped
    assert text.add(ord("x")) == "ENx"  # "ENx" cannot become "END": released
    assert [text.add(ord(c)) for c in "EN"] == ["", ""]
    assert text.add(ord("D")) == "" and text.stopped and text.sent == "abENx"
    assert text.finish() == ""
