"""Sentinel URLs: what Settings accepts, how a bad one is explained, what Celery is given."""

from __future__ import annotations

import ssl

import pytest

from predictq.celeryconf import celery_config
from predictq.errors import ConfigError
from predictq.redis_client import client_from_url
from predictq.sentinel import parse
from predictq.settings import Settings, mask_url

URL = "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://s3.internal"


def sentinel_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "broker_url": URL,
        "result_backend": URL.replace("/2", "/3"),
        "sentinel_master": "mymaster",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_a_sentinel_url_lists_every_sentinel_and_takes_db_and_password_from_the_first() -> None:
    parsed = parse(URL, name="X")
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("s3.internal", 26379))
    assert parsed.db == 2 and parsed.password == "pw" and parsed.tls == {}
    assert parsed.celery_url() == (
        "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2;"
        "sentinel://:pw@s3.internal:26379/2"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h:26379;", "entry 2 is empty; expected sentinel://host:port"),
        ("sentinel://h:26379;redis://h2:6379/0", "entry 2 starts with redis://; every entry"),
        ("redis://h:6379/0;sentinel://h2:26379", "entry 1 starts with redis://; every entry"),
        ("sentinel://h:1;:secret@h2:1", "entry 2 has no scheme; every entry"),
        ("sentinel://h:notaport", "entry 1: expected host:port with a port 1-65535"),
        ("sentinel://h:70000", "entry 1: expected host:port with a port 1-65535"),
        ("sentinel://h:0", "entry 1: expected a port 1-65535, got 0"),
        ("sentinel://:26379", "entry 1: expected sentinel://host:port, found no host"),
        ("sentinel://h:26379/zero", "expected a database number after the port .*got /zero"),
        ("sentinel://h:1/0;sentinel://h2:1/1", "entry 2 gives another database than entry 1"),
        ("sentinel://:a@h:1;sentinel://:b@h2:1", "entry 2 gives another password than entry 1"),
        ("sentinel://h:1;sentinel://h:1", "sentinel h:1 is listed twice"),
        ("sentinel://h:1?timeout=3", "unknown option 'timeout'; Sentinel URLs take ssl_cert_reqs"),
        ("sentinel://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required, optional or none"),
    ],
)
def test_a_malformed_sentinel_url_is_one_line_naming_the_variable(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env({"PREDICTQ_BROKER_URL": url, "PREDICTQ_SENTINEL_MASTER": "m"})
    assert str(caught.value).startswith("PREDICTQ_BROKER_URL: ")
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_a_sentinel_url_without_a_master_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="PREDICTQ_SENTINEL_MASTER must be the master set's name"):
        Settings.from_env({"PREDICTQ_RESULT_BACKEND": "sentinel://h:26379/1"})
    with pytest.raises(ConfigError, match="needs the master set's name"):
        client_from_url("sentinel://h:26379/1")


def test_passwords_of_every_entry_and_of_the_sentinels_are_masked() -> None:
    settings = sentinel_settings(sentinel_password="sentinelpw")
    assert "pw" not in mask_url(URL).replace("***", "")
    assert mask_url("sentinel://:a@h:1/0;sentinel://:a@h2:1/0") == (
        "sentinel://:***@h:1/0;sentinel://:***@h2:1/0"
    )
    shown = dict(settings.public_items())
    assert shown["PREDICTQ_SENTINEL_PASSWORD"] == "***"
    assert "sentinelpw" not in repr(settings)


def test_celery_gets_the_master_name_and_sentinel_options_on_both_ends() -> None:
    config = celery_config(sentinel_settings(sentinel_password="spw"))
    for url_key, options_key in (
        ("broker_url", "broker_transport_options"),
        ("result_backend", "result_backend_transport_options"),
    ):
        assert config[url_key].startswith("sentinel://:pw@10.0.0.1:26379/")
        assert config[url_key].count("sentinel://") == 3
        options = config[options_key]
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == "spw"
        assert options["sentinel_kwargs"]["socket_timeout"] > 0
    # The broker keeps its other transport options (visibility timeout...).
    assert config["broker_transport_options"]["visibility_timeout"] == 3600
    assert "broker_use_ssl" not in config and "redis_backend_use_ssl" not in config


def test_tls_options_go_to_the_sentinels_and_to_the_master_not_to_celerys_url() -> None:
    tls = "?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    settings = sentinel_settings(broker_url="sentinel://h1:26379/0" + tls + ";sentinel://h2:26379")
    config = celery_config(settings)
    assert "?" not in config["broker_url"]
    assert config["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ca.pem",
    }
    sentinel_kwargs = config["broker_transport_options"]["sentinel_kwargs"]
    assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert "redis_backend_use_ssl" not in config  # the backend's URL asked for no TLS


def test_plain_urls_keep_celerys_plain_redis_configuration() -> None:
    config = celery_config(Settings())
    assert config["broker_url"] == "redis://localhost:6379/0"
    assert "master_name" not in config["broker_transport_options"]
    assert "master_name" not in config["result_backend_transport_options"]
