"""lmx for a team: key scopes, a re-read key file, per-key limits, CORS, TLS, and untrusted
model files. Every check goes through a real HTTP client against a real server."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config, wait_for

MODEL = "smollm2-135m-instruct.q4_1"
INFER, ADMIN, BOT, CAPPED = "sk-infer-1111", "sk-admin-2222", "sk-bot-3333", "sk-cap-4444"
SECRETS = (INFER, ADMIN, BOT, CAPPED)
CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


def post(url: str, **kw: Any) -> httpx.Response:
    return httpx.post(url, **{"timeout": 60, **kw})  # a first request may load the model


def get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, **{"timeout": 60, **kw})


def options(url: str, **kw: Any) -> httpx.Response:
    return httpx.options(url, **{"timeout": 60, **kw})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.txt"
    p.write_text(
        f"# name: key [options]\nalice: {INFER}\nbot: {BOT} max_concurrent=1\ncapped: {CAPPED}\n"
    )
    return p


@pytest.fixture(scope="module")
def team(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text("[keys.capped]\nmax_tokens = 6\n")
    rt = Runtime(make_config(path=config, admin_key=ADMIN, api_key_file=key_file))
    with ServerThread(rt) as srv:
        yield srv
    rt.close()


# ----- scopes -----------------------------------------------------------------------------------


def test_no_key_is_401_in_each_dialect(team: ServerThread) -> None:
    r = post(team.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = get(team.url + "/api/tags", headers=bearer("sk-wrong"))
    assert r.status_code == 401 and isinstance(r.json()["error"], str)  # Ollama's shape
    r = get(team.url + "/admin/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert get(team.url + "/health").status_code == 200  # stays open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=team.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=team.url).list()
    assert e.value.status_code == 401


def test_an_inference_key_serves_but_gets_403_on_admin_routes(team: ServerThread) -> None:
    client = openai.OpenAI(base_url=team.url + "/v1", api_key=INFER, max_retries=0)
    out = client.chat.completions.create(**CHAT)
    assert out.choices[0].message.content is not None
    r = get(team.url + "/admin/models", headers=bearer(INFER))
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["type"] == "permission_error" and err["code"] == "insufficient_scope"
    assert "'alice'" in err["message"] and INFER not in r.text
    admin_client = openai.OpenAI(base_url=team.url, api_key=INFER, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        admin_client.get("/admin/models", cast_to=object)
    oc = ollama.Client(host=team.url, headers=bearer(INFER))
    assert oc.list().models  # /api/tags is inference
    for call in (lambda: oc.pull("hf.co/a/b"), lambda: oc.delete(MODEL)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 403 and "admin key" in e.value.error
    r = get(team.url + "/metrics")
    assert r.status_code == 401  # keyed unless metrics_public
    assert get(team.url + "/metrics", headers=bearer(INFER)).status_code == 200


def test_the_admin_key_reaches_everything(team: ServerThread) -> None:
    r = get(team.url + "/admin/models", headers={"X-API-Key": ADMIN})
    assert r.status_code == 200 and r.json()["models"]
    r = post(team.url + "/admin/rescan", headers=bearer(ADMIN))
    assert r.status_code == 200
    r = post(team.url + "/v1/chat/completions", json=CHAT, headers=bearer(ADMIN))
    assert r.status_code == 200


def test_key_names_reach_the_log_and_metrics_but_keys_never_do(
    team: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for key in (INFER, ADMIN):
        r = post(team.url + "/v1/chat/completions", json=CHAT, headers=bearer(key))
        assert r.status_code == 200
    get(team.url + "/admin/models", headers=bearer(INFER))  # a 403, recorded too
    rt: Runtime = team.server.rt
    names = {(r.key, r.status) for r in rt.requests.recent()}
    assert {("alice", 200), ("admin", 200), ("alice", 403)} <= names
    metrics = get(team.url + "/metrics", headers=bearer(ADMIN)).text
    assert f'lmx_requests_total{{key="alice",model="{MODEL}",status="200"}}' in metrics
    assert 'lmx_requests_total{key="alice",model="",status="403"}' in metrics
    everything = caplog.text + metrics + repr(rt.settings) + repr(rt.keys.all())
    assert not any(s in everything for s in SECRETS)


def test_one_api_key_alone_still_grants_everything() -> None:
    rt = Runtime(make_config(api_key="solo"))
    try:
        with ServerThread(rt) as srv:
            assert get(srv.url + "/admin/models", headers=bearer("solo")).status_code == 200
            assert get(srv.url + "/admin/models").status_code == 401
    finally:
        rt.close()


def test_metrics_can_be_public() -> None:
    rt = Runtime(make_config(api_key="k", metrics_public=True))
    try:
        with ServerThread(rt) as srv:
            assert get(srv.url + "/metrics").status_code == 200
            assert get(srv.url + "/v1/models").status_code == 401
    finally:
        rt.close()


def test_the_key_file_is_read_again_when_it_changes(team: ServerThread, key_file: Path) -> None:
    new = "sk-new-5555"
    r = get(team.url + "/v1/models", headers=bearer(new))
    assert r.status_code == 401
    before = key_file.read_text()
    try:
        key_file.write_text(before + f"carol: {new} scope=admin\n")
        wait_for(lambda: get(team.url + "/admin/models", headers=bearer(new)).status_code == 200)
        key_file.write_text("this line is not a key\n")  # a broken file: the old keys stay
        r = get(team.url + "/admin/models", headers=bearer(new))
        assert r.status_code == 200
    finally:
        key_file.write_text(before)
    wait_for(lambda: get(team.url + "/v1/models", headers=bearer(new)).status_code == 401)


def test_a_public_bind_counts_an_admin_key_or_key_file(key_file: Path) -> None:
    from tests.conftest import make_settings

    assert make_settings(host="0.0.0.0").bind_refusal()
    assert make_settings(host="0.0.0.0", admin_key="a").bind_refusal() is None
    assert make_settings(host="0.0.0.0", api_key_file=key_file).bind_refusal() is None


# ----- per-key limits ---------------------------------------------------------------------------


class Stream:
    """A long streaming chat with a key, in a thread; `drop()` closes it mid-stream."""

    def __init__(self, url: str, key: str, path: str = "/v1/chat/completions") -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        self.stop = threading.Event()
        self.status = 0
        body: dict[str, Any] = {
            "model": MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "Write a long story."}],
        }
        if path.startswith("/v1"):
            body.update(max_tokens=1500, ignore_eos=True)
        else:
            body["options"] = {"num_predict": 1500}

        def run() -> None:
            with httpx.stream("POST", url + path, json=body, headers=bearer(key), timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
                    if self.stop.is_set():
                        return

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.started.wait(60), "the stream did not start"

    def drop(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_a_keys_concurrency_limit_is_429_with_retry_after(team: ServerThread) -> None:
    rt: Runtime = team.server.rt
    bot = next(k for k in rt.keys.all() if k.name == "bot")
    s = Stream(team.url, BOT)
    try:
        r = post(team.url + "/v1/chat/completions", json=CHAT, headers=bearer(BOT))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "'bot'" in err["message"]
        r = post(
            team.url + "/api/chat",
            json={**CHAT, "stream": False},
            headers=bearer(BOT),
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert isinstance(r.json()["error"], str)
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=team.url + "/v1", api_key=BOT, max_retries=0).embeddings.create(
                model=MODEL, input="x"
            )
        # Other keys are not held back by the bot's limit.
        r = post(team.url + "/v1/chat/completions", json=CHAT, headers=bearer(INFER))
        assert r.status_code == 200
    finally:
        s.drop()  # a client that goes away mid-stream gives its place back
    wait_for(lambda: bot.counter.active == 0)
    r = post(team.url + "/v1/chat/completions", json=CHAT, headers=bearer(BOT))
    assert r.status_code == 200


def test_a_keys_max_tokens_cap(team: ServerThread) -> None:
    r = post(
        team.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 50}, headers=bearer(CAPPED)
    )
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["param"] == "max_tokens" and "at most 6" in r.text
    r = post(
        team.url + "/api/generate",
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 50}},
        headers=bearer(CAPPED),
    )
    assert r.status_code == 429 and "at most 6" in r.json()["error"]
    body = {**CHAT, "ignore_eos": True}
    del body["max_tokens"]  # unset: the cap applies
    r = post(team.url + "/v1/chat/completions", json=body, headers=bearer(CAPPED))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6


# ----- browsers and remote boxes ----------------------------------------------------------------


def test_cors_is_off_by_default_and_allows_only_named_origins(server: ServerThread) -> None:
    pre = {"Origin": "http://ui.test", "Access-Control-Request-Method": "POST"}
    r = options(server.url + "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = get(server.url + "/v1/models", headers={"Origin": "http://ui.test"})
    assert "access-control-allow-origin" not in r.headers
    rt = Runtime(make_config(api_key="k", cors_origins=["http://ui.test"]))
    try:
        with ServerThread(rt) as srv:
            r = options(
                srv.url + "/v1/chat/completions",
                headers={**pre, "Access-Control-Request-Headers": "authorization,content-type"},
            )
            assert r.status_code == 204
            assert r.headers["access-control-allow-origin"] == "http://ui.test"
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = get(srv.url + "/v1/models", headers={"Origin": "http://ui.test", **bearer("k")})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "http://ui.test"
            r = get(srv.url + "/v1/models", headers={"Origin": "http://evil.test", **bearer("k")})
            assert "access-control-allow-origin" not in r.headers
    finally:
        rt.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lmx test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    import ssl

    from tests.test_cli import lmx

    cert, key = self_signed(tmp_path)
    rt = Runtime(make_config(tls_cert=cert, tls_key=key, admin_key=ADMIN))
    try:
        with ServerThread(rt) as srv:
            assert srv.url.startswith("https://127.0.0.1:")
            trust = ssl.create_default_context(cafile=str(cert))
            assert get(srv.url + "/health", verify=trust).status_code == 200
            with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
                get(srv.url + "/health")
            with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
                get(srv.url.replace("https", "http") + "/health")
            client = openai.OpenAI(
                base_url=srv.url + "/v1",
                api_key=ADMIN,
                max_retries=0,
                http_client=httpx.Client(verify=trust),
            )
            assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
            # The CLI finds it over HTTPS with the same settings (and the admin key).
            env = {
                "LMX_HOST": f"127.0.0.1:{srv.port}",
                "LMX_TLS_CERT": str(cert),
                "LMX_TLS_KEY": str(key),
                "LMX_ADMIN_KEY": ADMIN,
            }
            ps = lmx("ps", env=env)
            assert ps.returncode == 0 and ps.stdout.startswith("ID"), ps.stderr
            assert MODEL in ps.stdout
    finally:
        rt.close()


def test_a_bad_certificate_is_one_line_at_start(tmp_path: Path) -> None:
    from tests.test_cli import lmx

    (tmp_path / "cert.pem").write_text("not a certificate")
    r = lmx(
        "--no-ui",
        "--port",
        "0",
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "cert.pem"),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot serve HTTPS" in lines[0], r.stderr
    r = lmx("--no-ui", "--port", "0", "--tls-cert", str(tmp_path / "cert.pem"))
    assert r.returncode == 2 and "--tls-cert needs --tls-key" in r.stderr


# ----- untrusted model files --------------------------------------------------------------------


def gguf_bytes(metadata: dict[str, str]) -> bytes:
    """A GGUF v3 header with these string keys and no tensors."""

    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for k, v in metadata.items():
        out += s(k) + struct.pack("<I", 8) + s(v)
    return out + b"\0" * (-len(out) % 32)  # the data section starts aligned


def test_escape_sequences_in_metadata_and_file_names_are_removed(tmp_path: Path) -> None:
    evil = "\x1b[2J\x1b[H\x1b]0;owned\x07"
    (tmp_path / f"trick{evil}y.gguf").write_bytes(
        gguf_bytes(
            {
                "general.architecture": f"llama{evil}",
                "general.name": f"Nice\x9b31m Model{evil}",
                "tokenizer.chat_template": "{{ messages }}\n\t{{ x }}\x1b[31m",
            }
        )
    )
    rt = Runtime(make_config(model_dirs=[tmp_path], include_default_model=False))
    try:
        with ServerThread(rt) as srv:
            models = get(srv.url + "/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["tricky"]
            assert models[0]["lmx"]["architecture"] == "llama"
            show = post(srv.url + "/api/show", json={"model": "tricky"}).json()
            assert show["model_info"]["general.name"] == "Nice Model"
            assert show["template"] == "{{ messages }}\n\t{{ x }}"  # newlines kept
            text = get(srv.url + "/v1/models").text + str(show)
            assert "\x1b" not in text and "\x9b" not in text
    finally:
        rt.close()


def test_a_template_that_breaks_the_sandbox_is_marked_broken(tmp_path: Path) -> None:
    from tests.test_cli import lmx

    config = tmp_path / "config.toml"
    config.write_text(
        f'[models."{MODEL}"]\n'
        "chat_template = \"{{ messages[0]['content'].__class__.__mro__ }}\"\n"
    )
    rt = Runtime(make_config(path=config))
    try:
        with ServerThread(rt) as srv:
            r = post(srv.url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 422 and r.json()["error"]["code"] == "chat_template_broken"
            r = post(srv.url + "/api/chat", json={**CHAT, "stream": False})
            assert r.status_code == 422 and "chat template" in r.json()["error"]
            m = next(m for m in get(srv.url + "/admin/models").json()["models"] if m["id"] == MODEL)
            assert "sandbox" in m["template_error"]
            ls = lmx("ls", env={"LMX_HOST": srv.url})
            assert ls.returncode == 0 and f"{MODEL}: chat template broken" in ls.stdout
            # Plain completions do not use the template and still work.
            r = post(
                srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}
            )
            assert r.status_code == 200
    finally:
        rt.close()
