"""Remote sources (data/remote.py) against real servers on loopback: moto's S3 server and an HTTP server with
range requests, each behind a fault-injecting proxy (tests/netservers.py). Every stream is compared with the
stream of the same files read from local disk; nothing here touches an address other than 127.0.0.1."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import read_log, run_train, start_train, tiny_args, train_losses, wait_for
from netservers import S3_KEYS, Fault, FaultProxy, HTTPFileServer, S3Server
from test_reliability import _assert_same_weights

from gpt2_training import checkpoint as ckpt
from gpt2_training import data as data_package
from gpt2_training.cli import parse_config, prepare_main
from gpt2_training.config import DataArguments
from gpt2_training.data import ShardStream, resolve_tokenizer, train_stream
from gpt2_training.data.remote import NetworkSettings, reason, redact
from gpt2_training.errors import ConfigError, DataError, DataUnavailable
from gpt2_training.options import validate

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("deeplake")

WORDS = "the a of river stone light model token data stream shard over under quick slow network byte".split()
# quick retries, so that a fault costs a fraction of a second
FAST = {"network_retries": 3, "network_backoff": 0.05, "network_backoff_max": 0.2, "network_timeout": 1.0}


def _documents(n: int, seed: int, words: tuple[int, int] = (8, 60)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + f" ({i})" for i in range(n)]


def _write_corpus(folder: Path, docs: list[str], files: int) -> None:
    import deeplake
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [docs[i::files] for i in range(files)]
    for name in ("parquet", "jsonl"):
        (folder / name).mkdir(parents=True)
    for i, part in enumerate(parts):
        pq.write_table(pa.table({"text": part}), folder / "parquet" / f"part-{i}.parquet", row_group_size=64)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in part)
        (folder / "jsonl" / f"part-{i}.jsonl").write_text(lines)
    dataset = deeplake.create(str(folder / "deeplake"))
    dataset.add_column("text", deeplake.types.Text())
    dataset.append({"text": docs})
    dataset.commit()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The corpus on local disk, in S3 (bucket `corpus`) and over HTTP, each server behind its own proxy."""
    root = tmp_path_factory.mktemp("remote")
    local = root / "local"
    # DeepLake shards by 1024-row chunks: 2600 rows make three, so read-ahead and shuffling have work to do
    _write_corpus(local, _documents(2600, seed=1), files=3)
    small = root / "small"
    # an epoch of a few training steps, so that a run reads it again and again
    _write_corpus(small, _documents(240, seed=2, words=(1, 3)), files=2)
    s3 = S3Server()
    s3.upload_folder(local, "corpus", "big")
    s3.upload_folder(small, "corpus", "small")
    http = HTTPFileServer(root)
    servers = SimpleNamespace(
        root=root,
        local=local,
        small=small,
        s3=s3,
        http=http,
        s3_proxy=FaultProxy(s3.endpoint),
        http_proxy=FaultProxy(http.url),
    )
    yield servers
    for proxy in (servers.s3_proxy, servers.http_proxy):
        proxy.stop()
    http.stop()
    s3.stop()


@pytest.fixture
def aws(net, monkeypatch, env):
    """The test keys and the S3 proxy as AWS_ENDPOINT_URL, with no AWS setting of the user's; the proxies start
    clean (no latency, no queued fault, up)."""
    for key in [k for k in env if k.startswith("AWS_")]:
        monkeypatch.delenv(key, raising=False)
    for key, value in {**S3_KEYS, "AWS_ENDPOINT_URL": net.s3_proxy.url}.items():
        monkeypatch.setenv(key, value)
    for proxy in (net.s3_proxy, net.http_proxy):
        proxy.up()
        proxy.latency = 0.0
        proxy.watch, proxy.most_waiting = b"", 0
        proxy.clear()
    sub = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    return {**sub, **S3_KEYS, "AWS_ENDPOINT_URL": net.s3_proxy.url}


_COMMON = {"shuffle": True, "seed": 7, "max_piece_chars": 1 << 20}


def _settings(**overrides) -> dict:
    """`FAST` as `data_package.open_source`'s network settings."""
    settings = {k.removeprefix("network_"): v for k, v in FAST.items()}
    return {**settings, **overrides}


def _pairs(net) -> dict[str, tuple[str, str, FaultProxy]]:
    """name -> (local spec, remote spec, the proxy in front of the remote one)."""
    local, http = net.local, f"{net.http_proxy.url}/local"
    return {
        "deeplake-s3": (f"deeplake:{local}/deeplake", "s3://corpus/big/deeplake", net.s3_proxy),
        "deeplake-prefix": (f"deeplake:{local}/deeplake", "deeplake:s3://corpus/big/deeplake", net.s3_proxy),
        "parquet-s3-glob": (
            f"hf-parquet:{local}/parquet/*.parquet",
            "hf-parquet:s3://corpus/big/parquet/*.parquet",
            net.s3_proxy,
        ),
        "jsonl-s3-prefix": (f"hf-json:{local}/jsonl", "hf-json:s3://corpus/big/jsonl", net.s3_proxy),
        "parquet-http": (
            f"hf-parquet:{local}/parquet/part-1.parquet",
            f"hf-parquet:{http}/parquet/part-1.parquet",
            net.http_proxy,
        ),
        "jsonl-http": (
            f"hf-json:{local}/jsonl/part-2.jsonl",
            f"hf-json:{http}/jsonl/part-2.jsonl",
            net.http_proxy,
        ),
    }


def _object(name: str) -> bytes:
    """The first line's start of a GET of one object of the source `name` (what a fault is matched against)."""
    return {
        "parquet-s3-glob": b"GET /corpus/big/parquet/part-1.parquet",
        "jsonl-s3-prefix": b"GET /corpus/big/jsonl/part-1.jsonl",
        "parquet-http": b"GET /local/parquet/part-1.parquet",
        "deeplake-s3": b"GET /corpus/big/deeplake/",
    }[name]


@pytest.fixture
def tokenizer(env):
    return resolve_tokenizer(DataArguments(dataset="builtin", tokenizer_vocab_size=1024))


def _stream(spec: str, tokenizer, **settings):
    args = DataArguments(dataset=spec, block_size=32, shuffle_buffer=16, **{**FAST, **settings})
    return train_stream(args, tokenizer, seed=7)


def _take(stream, n: int) -> list[np.ndarray]:
    return [next(stream).copy() for _ in range(n)]


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# -- 1. the same sequences as from local disk, and exact resume ------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["deeplake-s3", "deeplake-prefix", "parquet-s3-glob", "jsonl-s3-prefix", "parquet-http", "jsonl-http"],
)
def test_remote_stream_equals_local_and_resumes_exactly(net, aws, tokenizer, name):
    """The training stream from a server equals the stream of the same files on local disk (same sequences,
    same order, shards shuffled); a stream restored from a saved state continues exactly."""
    local_spec, remote_spec, proxy = _pairs(net)[name]
    expected = _take(_stream(local_spec, tokenizer), 60)
    before = proxy.requests
    stream = _stream(remote_spec, tokenizer)
    first = _take(stream, 25)
    assert proxy.requests > before, "the remote stream did not go through the server"
    assert _equal(first, expected[:25])
    meta, arrays = stream.state_dict()
    restored = _stream(remote_spec, tokenizer)
    restored.load_state_dict(meta, arrays)
    assert _equal(_take(restored, 35), expected[25:])


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_read_ahead_keeps_at_most_its_depth_of_reads_in_flight(net, aws, tokenizer, prefetch):
    """--network_prefetch N reads up to N files at once, never more (0 and 1: one at a time), and the stream
    is the same sequences as from local disk. With 0.3 s of latency per request, requests that wait at the
    proxy at the same time were in flight together."""
    local_spec, remote_spec, proxy = _pairs(net)["parquet-s3-glob"]
    expected = _take(_stream(local_spec, tokenizer), 40)
    proxy.latency, proxy.watch = 0.3, b"GET /corpus/big/parquet/part-"
    got = _take(_stream(remote_spec, tokenizer, network_prefetch=prefetch), 40)
    assert _equal(got, expected)
    assert proxy.most_waiting == max(prefetch, 1)


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


def _settle(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _many_records(net) -> str:
    """A JSON-lines file over HTTP with more records than a read-ahead queue holds."""
    path = net.root / "many" / "docs.jsonl"
    if not path.exists():
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents(3000, 3)))
    return f"hf-json:{net.http_proxy.url}/many/docs.jsonl"


def test_closing_the_pieces_ends_every_read_ahead_thread(net, aws):
    """Pieces abandoned in the middle of a file with more records than a read-ahead queue holds: every
    read-ahead thread ends, the one of the file being read included (it would wait for room forever)."""
    source = data_package.open_source(
        _many_records(net), text_field="text", network=_settings(prefetch=2), **_COMMON
    )
    before = set(_read_ahead_threads())
    pieces = source.pieces(0)
    next(pieces)
    mine = [t for t in _read_ahead_threads() if t not in before]
    assert mine
    pieces.close()
    assert _settle(lambda: not any(t.is_alive() for t in mine)), mine


def test_the_read_ahead_is_stopped_before_the_interpreter_exits(net, aws):
    """A process that exits with pieces still open: its read-ahead threads are stopped and waited for before
    Python finalizes (one left inside pyarrow's reader then can abort the interpreter)."""
    code = f"""
import atexit, threading
# registered before the reader's own handler, so it runs after it (last in, first out)
atexit.register(lambda: print("at exit:", sum(t.name == "read-ahead" for t in threading.enumerate())))
from gpt2_training.data import open_source
source = open_source({_many_records(net)!r}, text_field="text", network={{"prefetch": 2}}, **{_COMMON!r})
pieces = source.pieces(0)
next(pieces)
print("reading:", sum(t.name == "read-ahead" for t in threading.enumerate()), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], env=aws, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^reading: [1-9]", done.stdout, re.M), done.stdout
    assert "at exit: 0" in done.stdout, done.stdout


def test_a_read_that_fails_after_its_pieces_were_closed_is_not_retried(net, aws, capfd):
    """The read-ahead of the second file stalls past the timeout; its pieces are closed meanwhile and the
    server goes down: the failed read ends there, without a retry or a retry line."""
    source = data_package.open_source(
        "hf-parquet:s3://corpus/big/parquet/*.parquet",
        text_field="text",
        network=_settings(prefetch=2),
        **_COMMON,
    )
    second = source.shard_order(0)[1]
    net.s3_proxy.inject(Fault("stall", seconds=2.0, match=f"GET /corpus/big/parquet/part-{second}.".encode()))
    before = set(_read_ahead_threads())
    pieces = source.pieces(0)
    next(pieces)
    mine = [t for t in _read_ahead_threads() if t not in before]
    capfd.readouterr()
    pieces.close()
    net.s3_proxy.down()
    assert _settle(lambda: not net.s3_proxy.pending())
    assert _settle(lambda: not any(t.is_alive() for t in mine)), mine
    assert "network: retry" not in capfd.readouterr().err


# -- 2. faults: retried, logged once each with the URL, nothing lost or repeated -------------------------------
FAULTS = {
    "drop": Fault("drop", after_bytes=100),
    "reset": Fault("reset", after_bytes=100),
    "stall": Fault("stall", seconds=1.5),
    "503": Fault("status", status=503),
    "500": Fault("status", status=500),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", ["parquet-s3-glob", "jsonl-s3-prefix", "parquet-http", "deeplake-s3"])
def test_faults_leave_the_stream_unchanged(net, aws, tokenizer, capfd, name, fault):
    """Each injected fault (a dropped or reset connection, a stall past the timeout, 503 SlowDown, 500) is
    survived: the sequences equal a clean local run's. Our reader logs each retry once, naming the URL and the
    reason; DeepLake retries inside its own storage layer, so there only the sequences are checked."""
    local_spec, remote_spec, proxy = _pairs(net)[name]
    expected = _take(_stream(local_spec, tokenizer, network_prefetch=0), 40)
    capfd.readouterr()
    # the faults meet the first two reads of the data's objects (not listings or HEADs); the stream's first
    # reads run while it opens (the held-out split reads ahead) and in the read-ahead threads
    # Two faults on one object: aiohttp itself repeats a request once when a reused connection drops, so a
    # single drop would be absorbed below the reader
    proxy.inject(*[replace(FAULTS[fault], match=_object(name))] * 2)
    got = _take(_stream(remote_spec, tokenizer), 40)
    assert not proxy.pending(), "the faults were not met"
    assert _equal(got, expected)
    if name.startswith("deeplake"):
        return
    retries = [line for line in capfd.readouterr().err.splitlines() if line.startswith("network: retry")]
    assert retries, "no retry was logged"
    url = re.escape(remote_spec.split(":", 1)[1].split("*")[0])
    for line in retries:
        assert re.match(rf"network: retry [1-3]/3 of {url}\S* in \d+\.\d s: \S+", line), line
        assert "part-1." in line, line


def test_outage_beyond_the_budget_raises_data_unavailable_then_resumes_exactly(net, aws, tokenizer):
    """A server that stays down past the retry budget: DataUnavailable naming the URL, after the bounded
    number of retries (each logged); once it is back, a stream restored from the last saved state continues
    with exactly the sequences of an uninterrupted run."""
    local_spec, remote_spec = f"hf-parquet:{net.small}/parquet", "hf-parquet:s3://corpus/small/parquet"
    proxy = net.s3_proxy
    expected = _take(_stream(local_spec, tokenizer), 200)
    # read on demand; an epoch of the small corpus is a few dozen sequences, so the stream reads it again soon
    stream = _stream(remote_spec, tokenizer, network_prefetch=0)
    got = _take(stream, 10)
    meta, arrays = stream.state_dict()
    proxy.down()
    started = time.monotonic()
    with pytest.raises(DataUnavailable) as error:
        for _ in range(190):
            got.append(next(stream).copy())
    message = str(error.value)
    assert re.search(r"s3://corpus/small/parquet/part-\d\.parquet stopped answering: 3 retries in", message)
    assert "run the same command to resume" in message and "\n" not in message
    budget = sum(NetworkSettings(3, 0.05, 0.2).wait(a) for a in (1, 2, 3))
    assert time.monotonic() - started < budget + 20
    assert _equal(got, expected[: len(got)])
    proxy.up()
    restored = _stream(remote_spec, tokenizer, network_prefetch=0)
    restored.load_state_dict(meta, arrays)
    assert _equal(_take(restored, 190), expected[10:])


@pytest.mark.parametrize("name", ["parquet-s3-glob", "deeplake-s3", "jsonl-http"])
def test_access_denied_fails_fast_with_what_to_set(net, aws, tokenizer, capfd, name):
    """A 403 is not retried: a one-line DataError names the URL and what to set."""
    _, remote_spec, proxy = _pairs(net)[name]
    proxy.inject(*[Fault("status", status=403)] * 3)
    started = time.monotonic()
    with pytest.raises(DataError) as error:
        _take(_stream(remote_spec, tokenizer), 5)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "access denied" in message and "\n" not in message
    if name.startswith("jsonl-http"):
        assert "the server refuses this URL" in message
    else:
        assert "AWS_ACCESS_KEY_ID" in message and "AWS_PROFILE" in message and "AWS_ENDPOINT_URL" in message
    assert "network: retry" not in capfd.readouterr().err


def test_prepare_reads_remote_sources(net, aws, tokenizer, tmp_path):
    """`train.py prepare` from S3 writes the same token shards as from the same files on local disk."""
    tokenizer.save_pretrained(tmp_path / "tok")
    sequences = {}
    for where, spec in (
        ("local", f"hf-parquet:{net.small}/parquet"),
        ("s3", "hf-parquet:s3://corpus/small/parquet"),
    ):
        before = net.s3_proxy.requests
        prepare_main(
            ["--dataset", spec, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / where)]
        )
        assert (net.s3_proxy.requests > before) == (where == "s3")
        stream = ShardStream(tmp_path / where, "train", 32, shuffle=False, loop=False)
        sequences[where] = [seq.copy() for seq in stream]
    assert sequences["local"] and _equal(sequences["s3"], sequences["local"])


def test_network_settings_are_validated():
    cfg = parse_config(
        ["--network_retries", "-1", "--network_backoff", "2", "--network_backoff_max", "1"]
        + ["--network_timeout", "0", "--network_prefetch", "-1"]
    )
    with pytest.raises(ConfigError) as error:
        validate(cfg, cuda_available=False, bf16_ok=False)
    text = str(error.value)
    for fragment in (
        "network_retries must be >= 0",
        "network_backoff_max=1.0 is below network_backoff=2.0",
        "network_timeout must be > 0",
        "network_prefetch must be >= 0",
    ):
        assert fragment in text


def test_urls_in_descriptions_and_reasons_lose_their_credentials():
    """A URL's user, password and query (a presigned URL's signature) never reach a description or a log line."""
    assert redact("https://user:pw@data.example:8443/c/part-1.parquet?X-Amz-Signature=s") == (
        "https://data.example:8443/c/part-1.parquet"
    )
    error = OSError("503, message='Slow Down', url='https://data.example/p.parquet?X-Amz-Signature=secret'")
    assert reason(error) == "OSError: 503, message='Slow Down', url='https://data.example/p.parquet'"


def test_backoff_doubles_and_is_capped():
    settings = NetworkSettings(retries=6, backoff=0.5, backoff_max=3.0)
    assert [settings.wait(a) for a in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


# -- training runs (subprocesses) ------------------------------------------------------------------------------
def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplake-s3", "parquet-s3-glob"])
def test_training_from_s3_equals_local_resumes_bit_exact_and_keeps_secrets(
    net, aws, tokenizer, tmp_path, name
):
    """`train.py` from S3: killed with SIGKILL at a random step and resumed, its losses at every step and its
    final weights equal those of an uninterrupted run from the same files on local disk. The secret key and
    session token (unique values) appear in no file the runs wrote and nowhere in their output."""
    local_spec, remote_spec, _ = _pairs(net)[name]
    tokenizer.save_pretrained(tmp_path / "tok")
    secret = f"sentinel-secret-{random.randrange(10**12)}"
    token = f"sentinel-token-{random.randrange(10**12)}"
    env = {**aws, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token}
    settings = dict(
        max_steps=8, save_steps=2, shuffle_buffer=16, tokenizer=str(tmp_path / "tok"), save_total_limit=2
    )
    straight, remote = tmp_path / "local", tmp_path / "remote"
    ref = start_train(tiny_args(straight, dataset=local_spec, **settings), env)
    remote_args = tiny_args(remote, dataset=remote_spec, **settings)
    step = random.randint(3, 6)
    with open(tmp_path / "remote.stdout", "w") as log:
        proc = start_train(remote_args, env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # test_reliability's helper waits 90 s; a remote run on a loaded 2-core machine needs longer
            wait_for(lambda: max(train_losses(remote), default=0) >= step, 240, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert ckpt.latest_checkpoint(remote) is not None
    resumed = run_train(remote_args, env, timeout=180)
    assert resumed.returncode == 0, resumed.stdout
    assert "resuming from" in resumed.stdout
    ref_out, _ = ref.communicate(timeout=180)
    assert ref.returncode == 0, ref_out
    assert sorted(train_losses(straight)) == list(range(1, 9))
    assert train_losses(remote) == train_losses(straight), f"killed at step {step}"
    _assert_same_weights(straight / "final" / "model.safetensors", remote / "final" / "model.safetensors")
    outputs = [
        (Path("remote.stdout"), (tmp_path / "remote.stdout").read_bytes()),
        (Path("stdout"), resumed.stdout.encode()),
    ]
    for path, data in _all_bytes(remote) + outputs:
        for sentinel in (secret, token):
            assert sentinel.encode() not in data, f"{sentinel} written to {path}"


@pytest.mark.slow
def test_training_stops_with_a_checkpoint_when_the_server_stays_down_then_resumes_exactly(
    net, aws, tokenizer, tmp_path
):
    """The S3 server goes down mid-run beyond the retry budget: the run exits with status 2 and one line naming
    the URL, with a checkpoint at its last completed step; once the server is back, the same command resumes
    and its losses equal those of an uninterrupted local run."""
    _, _, proxy = _pairs(net)["parquet-s3-glob"]
    tokenizer.save_pretrained(tmp_path / "tok")
    settings = dict(
        max_steps=30,
        save_steps=100,
        shuffle_buffer=0,
        tokenizer=str(tmp_path / "tok"),
        network_prefetch=0,
        **FAST,
    )
    straight, remote = tmp_path / "local", tmp_path / "remote"
    ref = run_train(
        tiny_args(straight, dataset=f"hf-parquet:{net.small}/parquet", **settings), aws, timeout=180
    )
    assert ref.returncode == 0, ref.stdout
    args = tiny_args(remote, dataset="hf-parquet:s3://corpus/small/parquet", **settings)
    with open(tmp_path / "down.out", "w") as log:
        proc = start_train(args, aws, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: max(train_losses(remote), default=0) >= 2, 120, proc)
        proxy.down()
        proc.wait(timeout=120)
    proxy.up()
    out = (tmp_path / "down.out").read_text()
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert re.search(r"s3://corpus/small/parquet/part-\d\.parquet stopped answering", last), out
    done = max(train_losses(remote))
    assert done < 30
    latest = ckpt.latest_checkpoint(remote)
    assert latest is not None and latest.name.endswith(str(done)), (latest, done)
    resumed = run_train(args, aws, timeout=180)
    assert resumed.returncode == 0, resumed.stdout
    assert train_losses(remote) == train_losses(straight)
    assert read_log(remote)
