"""API keys and job ownership, against a real Redis (the conftest's private Valkey)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from bailan.jobs import Keys, RecordField
from bailan.keys import ANONYMOUS, KeyRing, KeysFileError, hash_key, new_key, parse_keys
from tests.test_api import REPO, make_settings

ALICE, BOB, ROOT = "bl_alice-secret", "bl_bob-secret", "bl_root-secret"


def write_keys(path: Path, text: str) -> None:
    path.write_text(text)
    # A reload is seen by mtime/size/inode; make sure the mtime moves even within one tick.
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    write_keys(path, f"# team keys\nalice {hash_key(ALICE)}\n\nbob {hash_key(BOB)}  # the other one\n"
                     f"root {hash_key(ROOT)} admin\n")
    return path


@pytest.fixture
def client(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url, api_keys_file=keys_file))) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit_as(client: TestClient, key: str, **body: object) -> str:
    r = client.post("/v1/jobs", json={"prompt": "x", **body}, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_parse_keys_file_format() -> None:
    """Guards: the documented line format (comments, blank lines, admin flag) misread."""
    keys = parse_keys(f"# c\n\nalice {hash_key('a')}\nroot {hash_key('r').upper()} admin # x\n")
    assert {p.name: p.admin for p in keys.values()} == {"alice": False, "root": True}
    assert hash_key("r") in keys  # hex compared lower-case


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice", "expected"),
        (f"alice {hash_key('a')} root", "expected"),
        ("alice nothex", "sha256"),
        (f"al ice {hash_key('a')}", "expected"),
        (f"-x {hash_key('a')}", "key name"),
        (f"{ANONYMOUS} {hash_key('a')}", "reserved"),
        (f"a {hash_key('a')}\na {hash_key('b')}", "twice"),
        (f"a {hash_key('a')}\nb {hash_key('a')}", "already listed"),
    ],
)
def test_bad_keys_file_names_the_line(text: str, reason: str) -> None:
    """Guards: a malformed keys file accepted (a key silently missing or doubled) or refused without
    saying which line is wrong."""
    with pytest.raises(KeysFileError, match=reason) as info:
        parse_keys(text, "keys")
    assert "line" in str(info.value)


def test_bad_keys_file_stops_the_api_at_start(redis_url: str, tmp_path: Path) -> None:
    """Guards: an API that starts with an unreadable or malformed keys file (and then refuses everyone)."""
    bad = tmp_path / "bad"
    bad.write_text("alice nothex\n")
    for path in (bad, tmp_path / "missing"):
        with pytest.raises(ValueError, match="api_keys_file"):
            make_settings(redis_url, api_keys_file=path)


def test_keys_cli_prints_a_key_and_its_line(tmp_path: Path) -> None:
    """Guards: `python -m bailan.keys new` printing a line that does not accept its own key."""
    out = subprocess.run([sys.executable, "-m", "bailan.keys", "new", "carol", "--admin"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    key = out.split("it is not stored anywhere): ")[1].split()[0]
    line = out.split("BAILAN_API_KEYS_FILE: ")[1].strip()
    assert line == f"carol {hash_key(key)} admin"
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    assert KeyRing(path).lookup(key).name == "carol" and KeyRing(path).lookup(key).admin
    assert new_key("a", False)[0] != new_key("a", False)[0]
    bad = subprocess.run([sys.executable, "-m", "bailan.keys", "new", ANONYMOUS], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"},
                                     {"Authorization": "Bearer "}])
def test_missing_or_unknown_key_is_401_with_challenge(client: TestClient, headers: dict[str, str]) -> None:
    """Guards: an API with a keys file serving clients without a valid key, or answering them without
    the WWW-Authenticate challenge RFC 6750 asks for."""
    job_path = "/v1/jobs/" + "a" * 32
    for method, path in [("POST", "/v1/jobs"), ("GET", job_path), ("GET", job_path + "/events"),
                         ("POST", job_path + "/cancel"), ("GET", job_path + "/previews/latest"),
                         ("GET", job_path + "/previews/5"), ("GET", job_path + "/images/0"), ("GET", "/v1/models")]:
        r = client.request(method, path, json={"prompt": "x"} if method == "POST" else None, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer"), path


def test_probes_and_docs_stay_open(client: TestClient) -> None:
    """Guards: liveness and readiness probes (which carry no key) failing once keys are required."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # no worker, but not a 401
    schema = client.get("/openapi.json").json()
    assert "ApiKey" in schema["components"]["securitySchemes"]


def test_a_job_is_its_keys_alone(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: any client reading, fetching or canceling a job whose id it learns; another key's job
    must be a 404 exactly like an unknown one (its existence not revealed)."""
    job = submit_as(client, ALICE)
    assert redis_conn.hget(Keys.job(job), RecordField.owner) == b"alice"
    assert client.get(f"/v1/jobs/{job}", headers=auth(ALICE)).json()["status"] == "queued"
    unknown = client.get("/v1/jobs/" + "b" * 32, headers=auth(BOB))
    for method, suffix in [("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("GET", "/previews/latest"),
                           ("GET", "/previews/5"), ("GET", "/images/0")]:
        r = client.request(method, f"/v1/jobs/{job}{suffix}", headers=auth(BOB))
        assert r.status_code == 404, (suffix, r.text)
        assert r.json()["detail"].replace(job, "ID") == unknown.json()["detail"].replace("b" * 32, "ID")
    assert client.get(f"/v1/jobs/{job}", headers=auth(ALICE)).json()["status"] == "queued"  # bob canceled nothing


def test_admin_key_sees_and_cancels_every_job(client: TestClient) -> None:
    """Guards: an operator's admin key unable to inspect or cancel a client's job."""
    job = submit_as(client, ALICE)
    assert client.get(f"/v1/jobs/{job}", headers=auth(ROOT)).status_code == 200
    r = client.post(f"/v1/jobs/{job}/cancel", headers=auth(ROOT))
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert client.get(f"/v1/jobs/{job}", headers=auth(ALICE)).json()["status"] == "canceled"


def test_idempotency_keys_are_scoped_per_api_key(client: TestClient) -> None:
    """Guards: one client's Idempotency-Key replaying (leaking) another client's job, or refusing its
    request as a body mismatch, because both picked the same key."""
    headers = {"Idempotency-Key": "order-1"}
    a = client.post("/v1/jobs", json={"prompt": "x"}, headers={**headers, **auth(ALICE)})
    b = client.post("/v1/jobs", json={"prompt": "y"}, headers={**headers, **auth(BOB)})
    assert a.status_code == 202 and b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    again = client.post("/v1/jobs", json={"prompt": "x"}, headers={**headers, **auth(ALICE)})
    assert again.status_code == 200 and again.json()["id"] == a.json()["id"]


def test_keys_file_is_reloaded_when_it_changes(client: TestClient, keys_file: Path) -> None:
    """Guards: adding or revoking a key needing a restart; and a broken edit locking everyone out."""
    carol = "bl_carol-secret"
    assert client.get("/v1/models", headers=auth(carol)).status_code == 401
    write_keys(keys_file, f"alice {hash_key(ALICE)}\ncarol {hash_key(carol)}\n")
    assert client.get("/v1/models", headers=auth(carol)).status_code == 200
    assert client.get("/v1/models", headers=auth(BOB)).status_code == 401  # revoked
    write_keys(keys_file, "carol not-a-hash\n")  # a typo keeps the last good keys
    assert client.get("/v1/models", headers=auth(carol)).status_code == 200
    assert client.get("/v1/models", headers=auth(BOB)).status_code == 401


def test_open_mode_needs_no_key_and_is_announced(redis_url: str, redis_conn: redis.Redis,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Guards: open mode (no keys file) asking for keys, or starting without saying that it asks none."""
    with caplog.at_level("WARNING", logger="bailan.api"):
        with TestClient(create_app(make_settings(redis_url))) as c:
            job = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
            assert c.get(f"/v1/jobs/{job}").status_code == 200
    assert any("open mode" in record.getMessage() for record in caplog.records)
    assert redis_conn.hget(Keys.job(job), RecordField.owner) == ANONYMOUS.encode()


def test_cors_preflight_allows_authorization_and_idempotency_key(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a browser's preflight for a submit carrying Authorization, Idempotency-Key or
    Prefer (a held submit: refused with 400 until it was allowed) refused (CORS allowed only
    Content-Type), and the headers a client reads hidden from browser code (a held answer's
    Preference-Applied, an OpenAI-style answer's job id)."""
    with TestClient(create_app(make_settings(redis_url, cors_origins=["https://ui.example"]))) as c:
        r = c.options("/v1/jobs", headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers":
                                               "authorization, idempotency-key, content-type, prefer"})
        assert r.status_code == 200, r.text
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "idempotency-key" in allowed and "prefer" in allowed
        r = c.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": "https://ui.example", "Prefer": "wait=1"})
        assert r.headers["preference-applied"] == "wait=1"
        exposed = r.headers["access-control-expose-headers"].lower()
        for header in ("location", "retry-after", "x-bailan-step", "idempotent-replayed", "preference-applied",
                       "x-bailan-job-id", "x-should-retry"):
            assert header in exposed
