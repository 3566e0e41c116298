"""Sources in object storage: a real S3 API (moto's server, started here) read through fsspec by the
tokenizer's sample, `dapt data prepare` and the store build; credentials from the environment."""

import gzip
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dapt.base import DaptError
from dapt.data_mix.build import BuildRequest, build_stores
from dapt.data_mix.config import CorpusConfig, DataConfig, DedupConfig, HeldoutConfig
from dapt.data_mix.sources import CorpusReader
from dapt.data_mix.store import TokenStore

SECRET = "s3cr3t-never-written"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, with a bucket of a corpus, and the environment pointing at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET,
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    client = boto3.client("s3")
    deadline = time.time() + 30
    while True:
        try:
            client.create_bucket(Bucket="corpora")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    texts = [f"Filing {i}: revenue rose {i % 17} percent while the coupon stayed at {i % 5}.25 percent." for i in range(600)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts[:400]).encode()
    client.put_object(Bucket="corpora", Key="filings/part-0.jsonl", Body=body)
    client.put_object(Bucket="corpora", Key="filings/part-1.jsonl.gz",
                      Body=gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[400:]).encode()))
    local = tmp_path_factory.mktemp("local")
    (local / "part-0.jsonl").write_bytes(body)
    (local / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[400:]).encode()))
    yield client, local
    server.terminate()
    server.wait()
    log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_corpus_in_s3_builds_the_store_its_local_copy_does(s3, built_experiment, tmp_path):
    client, local = s3
    remote = CorpusConfig(name="filings", paths=["s3://corpora/filings/*.jsonl*"])
    assert len(list(CorpusReader(remote).documents())) == 600, "the tokenizer's sample and `data prepare` read it"
    data = DataConfig(tasks=2, workers=2)
    [built] = build_stores([remote], HeldoutConfig(fraction=0.05), DedupConfig(), data, built_experiment.tokenizer_dir,
                           tmp_path / "remote")
    [copy] = build_stores([CorpusConfig(name="filings", paths=[str(local / "*.jsonl*")])], HeldoutConfig(fraction=0.05),
                          DedupConfig(), data, built_experiment.tokenizer_dir, tmp_path / "local")
    assert built["splits"] == copy["splits"] and built["accounting"]["kept"] == 600
    for split in ("train", "heldout"):
        assert np.array_equal(np.asarray(TokenStore(tmp_path / "remote" / "filings", split).tokens),
                              np.asarray(TokenStore(tmp_path / "local" / "filings", split).tokens))
    written = (tmp_path / "remote" / "filings" / "manifest.json").read_text()
    assert "s3://corpora/filings/part-0.jsonl" in written and SECRET not in written, "URLs, never credentials"
    request = BuildRequest([remote], HeldoutConfig(fraction=0.05), DedupConfig(), built_experiment.tokenizer_dir,
                           tmp_path / "remote")
    assert request.staleness(remote) is None, "unchanged objects: up to date, by their ETags"
    client.put_object(Bucket="corpora", Key="filings/part-0.jsonl", Body=b'{"text": "replaced"}\n')
    request = BuildRequest([remote], HeldoutConfig(fraction=0.05), DedupConfig(), built_experiment.tokenizer_dir,
                           tmp_path / "remote")
    assert request.staleness(remote) == "source file s3://corpora/filings/part-0.jsonl changed since the build"


def test_storage_problems_are_one_line_naming_the_source(s3, monkeypatch):
    with pytest.raises(DaptError, match=r"corpus 'c': no file matches s3://corpora/nothing/\*.jsonl; check `paths`"):
        list(CorpusReader(CorpusConfig(name="c", paths=["s3://corpora/nothing/*.jsonl"])).documents())
    with pytest.raises(DaptError, match=r"corpus 'c': cannot read s3://no-such-bucket/x.jsonl: its bucket no-such-bucket does not exist"):
        list(CorpusReader(CorpusConfig(name="c", paths=["s3://no-such-bucket/x.jsonl"])).documents())
    with pytest.raises(DaptError, match=r"cannot read gs://bucket/x.jsonl: .*gcsfs"):
        list(CorpusReader(CorpusConfig(name="c", paths=["gs://bucket/x.jsonl"])).documents())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(DaptError, match=r"cannot read s3://corpora/filings/\*.jsonl\* .*no credentials found: set AWS_ACCESS_KEY_ID"):
        list(CorpusReader(CorpusConfig(name="c", paths=["s3://corpora/filings/*.jsonl*"])).documents())
