"""Unit tests of orch/auth.py, orch/tls.py helpers and the security settings: tokens, the token file, roles."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import orch.cli
import orch.config
from orch import auth
from orch.config import load_settings
from orch.core.errors import ConfigError
from orch.scheduler.security import exposure_warnings, unencodable_field
from orch.tls import is_loopback, make_certs


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orch.config, "default_config_path", lambda: tmp_path / "no-such-config.yaml")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tokens_are_random_long_and_prefixed_by_role() -> None:
    seen = {auth.new_token("client") for _ in range(200)}
    assert len(seen) == 200
    for t in seen:
        assert t.startswith("orch_c_") and len(t) >= 7 + 43  # 256 bits, URL-safe base64
    assert auth.new_token("join").startswith("orch_j_")
    cred, digest = auth.new_worker_credential()
    assert cred.startswith("orch_w_") and digest == auth.digest(cred) and len(digest) == 64
    assert cred not in digest


def test_token_file_is_made_once_mode_0600_atomically(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens, created = auth.ensure_tokens(data)
    path = auth.token_path(data)
    assert created and tokens.client and tokens.join and tokens.client != tokens.join
    assert mode(path) == 0o600
    assert mode(data) == 0o700  # a data dir made for it is private too
    assert [p.name for p in data.iterdir()] == ["tokens.json"]  # no temp file left behind
    again, created = auth.ensure_tokens(data)
    assert again == tokens and not created
    # A file left readable by others is tightened; a file missing a role gets one, the other stays.
    os.chmod(path, 0o644)
    auth.ensure_tokens(data)
    assert mode(path) == 0o600
    path.write_text(json.dumps({"client": tokens.client}))
    fixed, created = auth.ensure_tokens(data)
    assert created and fixed.client == tokens.client and fixed.join and fixed.join != tokens.join


def test_rotate_replaces_only_the_roles_asked(tmp_path: Path) -> None:
    first, _ = auth.ensure_tokens(tmp_path)
    sig = auth.file_signature(auth.token_path(tmp_path))
    new = auth.rotate(tmp_path, ("client",))
    assert new.client != first.client and new.join == first.join
    assert auth.read_tokens(tmp_path) == new
    assert auth.file_signature(auth.token_path(tmp_path)) != sig  # what the scheduler notices
    both = auth.rotate(tmp_path)
    assert both.client != new.client and both.join != new.join
    assert mode(auth.token_path(tmp_path)) == 0o600


def test_broken_token_file_is_an_error_not_a_guess(tmp_path: Path) -> None:
    auth.token_path(tmp_path).write_text("{not json")
    with pytest.raises(auth.TokenFileError, match="not valid JSON"):
        auth.read_tokens(tmp_path)
    auth.token_path(tmp_path).write_text('{"client": 5}')
    with pytest.raises(auth.TokenFileError, match="client"):
        auth.read_tokens(tmp_path)
    assert auth.read_tokens(tmp_path / "nowhere") is None


def test_bearer_and_constant_time_compare() -> None:
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer   abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer ", "abc", "Bearer " + "x" * 600):
        assert auth.bearer(bad) is None, bad
    assert auth.same("abc", "abc") and auth.same(b"abc", "abc")
    assert not auth.same("abc", "abd") and not auth.same("", "") and not auth.same(None, "x")
    # Header text can hold anything (aiohttp decodes with surrogateescape): never an exception.
    assert not auth.same("t\udcff\u00e9", "token")
    assert auth.digest("t\udcff") != auth.digest("t")


def test_pick_order_flag_then_configuration_then_data_dir(tmp_path: Path) -> None:
    tokens, _ = auth.ensure_tokens(tmp_path)
    assert auth.pick("flag", "conf", tmp_path, "client") == "flag"
    assert auth.pick(None, "conf", tmp_path, "client") == "conf"
    assert auth.pick(None, "", tmp_path, "client") == tokens.client
    assert auth.pick(None, None, tmp_path, "join") == tokens.join
    assert auth.pick(None, None, tmp_path / "empty", "join") is None


def test_security_settings_environment_and_defaults(tmp_path: Path) -> None:
    s = load_settings(None, {}, environ={})
    assert s["auth.enabled"] is True and s["auth.metrics_open"] is False
    assert s["auth.token"] == "" and s["tls.cert"] == "" and s["scheduler.max_long_polls"] >= 1
    s = load_settings(None, {}, environ={"ORCH_TOKEN": "c", "ORCH_JOIN_TOKEN": "j", "ORCH_AUTH_ENABLED": "false",
                                         "ORCH_TLS_CA": "/ca.pem", "ORCH_SERVER": "sched:8443"})
    assert (s["auth.token"], s["auth.join_token"], s["auth.enabled"]) == ("c", "j", False)
    assert s["client.server"] == "https://sched:8443"  # a private CA means a bare HOST:PORT is https
    assert load_settings(None, {"client.server": "http://h:1"}, environ={"ORCH_TLS_CA": "x"})["client.server"] == "http://h:1"
    with pytest.raises(ConfigError, match="auth.enabled"):
        load_settings(None, {}, environ={"ORCH_AUTH_ENABLED": "maybe"})


def test_disabling_auth_needs_the_flag_too(tmp_path: Path) -> None:
    """auth.enabled: false alone (a stray config line) does not open the scheduler: --no-auth must say so too."""
    cfg = tmp_path / "orch.yaml"
    cfg.write_text("auth:\n  enabled: false\n")
    r = CliRunner().invoke(orch.cli.app, ["scheduler", "--config", str(cfg), "--port", "0"])
    assert r.exit_code == 2 and "--no-auth" in r.output, r.output
    r = CliRunner().invoke(orch.cli.app, ["up", "--config", str(cfg), "--port", "0"])
    assert r.exit_code == 2 and "--no-auth" in r.output, r.output


def test_exposure_warnings() -> None:
    assert exposure_warnings("127.0.0.1", tls=False, auth_enabled=True) == []
    assert exposure_warnings("::1", tls=False, auth_enabled=True) == []
    assert exposure_warnings("0.0.0.0", tls=True, auth_enabled=True) == []
    (w,) = exposure_warnings("0.0.0.0", tls=False, auth_enabled=True)
    assert "without TLS" in w and "tls.cert" in w
    (w,) = exposure_warnings("localhost", tls=False, auth_enabled=False)
    assert "AUTHENTICATION IS OFF" in w
    assert len(exposure_warnings("10.1.2.3", tls=False, auth_enabled=False)) == 2
    assert is_loopback("127.0.0.5") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")


def test_unencodable_field_names_the_lone_surrogate() -> None:
    assert unencodable_field({"a": ["ok", {"b": "fine é 😀"}]}) is None
    assert unencodable_field({"a": ["ok", {"b": "bad \ud800"}]}) == "a[1].b"
    assert unencodable_field({"k\udfff": 1}) == "body"
    assert unencodable_field("\ud800") == "body"


def test_certs_init_makes_a_ca_and_a_server_cert(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    import ssl

    files = make_certs(tmp_path / "tls", ["sched.example", "10.0.0.5"])
    assert mode(files.key) == 0o600 and mode(files.ca_key) == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert, files.key)  # the pair matches
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"sched.example", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {"10.0.0.5", "127.0.0.1", "::1"}
    with pytest.raises(ConfigError, match="--force"):
        make_certs(tmp_path / "tls", [])
    make_certs(tmp_path / "tls", [], force=True)
    with pytest.raises(ConfigError, match="--host"):
        make_certs(tmp_path / "other", ["bad host name!"])


def test_certs_init_without_cryptography_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography now fails
    r = CliRunner().invoke(orch.cli.app, ["certs", "init", "--dir", str(tmp_path / "tls")])
    assert r.exit_code == 2, r.output
    assert "pip install 'orch[tls]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "tls").exists()


def test_token_show_and_rotate_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    r = runner.invoke(orch.cli.app, ["token", "show", "--data-dir", str(data)], env={})
    assert r.exit_code == 2 and "does not exist yet" in r.output
    tokens, _ = auth.ensure_tokens(data)
    r = runner.invoke(orch.cli.app, ["token", "show", "--client", "--data-dir", str(data)], env={})
    assert (r.exit_code, r.output) == (0, tokens.client + "\n")
    r = runner.invoke(orch.cli.app, ["token", "show", "--worker", "--data-dir", str(data)], env={})
    assert (r.exit_code, r.output) == (0, tokens.join + "\n")
    r = runner.invoke(orch.cli.app, ["token", "show", "--data-dir", str(data)], env={})
    assert r.exit_code == 0 and tokens.client in r.output and tokens.join in r.output and "tokens.json" in r.output
    r = runner.invoke(orch.cli.app, ["token", "rotate", "--worker", "--data-dir", str(data)], env={})
    assert r.exit_code == 0, r.output
    new = auth.read_tokens(data)
    assert new is not None and new.client == tokens.client and new.join != tokens.join and new.join in r.output
    r = runner.invoke(orch.cli.app, ["token", "show", "--client", "--worker", "--data-dir", str(data)], env={})
    assert r.exit_code == 2
    # ORCH_TOKEN wins over the file, as for every client verb.
    r = runner.invoke(orch.cli.app, ["token", "show", "--client", "--data-dir", str(data)], env={"ORCH_TOKEN": "mine"})
    assert r.output == "mine\n"
