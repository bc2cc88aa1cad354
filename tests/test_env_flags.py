"""Every option of every subcommand reads DS_<OPTION>; the command line wins; bad values are
usage errors that name the variable."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_cluster import envflags
from ds_cluster.cli import SUBCOMMANDS

REPO_ROOT = Path(__file__).resolve().parent.parent


def parser_for(module_name: str, environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    importlib.import_module(module_name).add_arguments(parser)
    envflags.apply(parser, environ)
    return parser


def parse(module_name: str, argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = parser_for(module_name, environ)
    args = parser.parse_args(argv)
    envflags.resolve(parser, args)
    return args


SHARD_ARGS = ["--id", "s0", "--listen", "127.0.0.1:1", "--data-dir", "/nowhere"]


def test_env_sets_typed_defaults_and_command_line_wins() -> None:
    environ = {
        "DS_LONG_POLL_TIMEOUT": "2.5",
        "DS_RING_VERSION": "7",
        "DS_SYNCHRONOUS": "NORMAL",
        "DS_CLUSTER_SECRET_FILE": "/run/secret",
    }
    args = parse("ds_cluster.shard.main", SHARD_ARGS, environ)
    assert args.long_poll_timeout == 2.5
    assert args.ring_version == 7
    assert args.synchronous == "NORMAL"
    assert args.cluster_secret_file == Path("/run/secret")
    args = parse("ds_cluster.shard.main", [*SHARD_ARGS, "--ring-version", "9"], environ)
    assert args.ring_version == 9  # the command line wins


def test_env_satisfies_required_options() -> None:
    environ = {"DS_ID": "ds-shard-1", "DS_LISTEN": "0.0.0.0:7000", "DS_DATA_DIR": "/data"}
    args = parse("ds_cluster.shard.main", [], environ)
    assert (args.id, args.listen, args.data_dir) == ("ds-shard-1", "0.0.0.0:7000", Path("/data"))
    with pytest.raises(SystemExit):  # still required without its variable
        parse("ds_cluster.shard.main", [], {"DS_ID": "x", "DS_LISTEN": "1:2"})


def test_empty_variable_is_unset() -> None:
    args = parse("ds_cluster.shard.main", SHARD_ARGS, {"DS_RING_VERSION": ""})
    assert args.ring_version == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False)],
)
def test_switches_accept_words(text: str, expected: bool) -> None:
    args = parse("ds_cluster.gateway.main", ["--listen", "h:1"], {"DS_REUSE_PORT": text})
    assert args.reuse_port is expected


def test_switch_on_command_line_wins_over_env_off() -> None:
    argv = ["--listen", "h:1", "--access-log"]
    args = parse("ds_cluster.gateway.main", argv, {"DS_ACCESS_LOG": "0"})
    assert args.access_log is True


def test_store_false_boolean_optional_count_and_append() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cache", dest="cache", action="store_false")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--verbose", action="count", default=0)
    parser.add_argument("--vs", action="append", default=[])
    parser.add_argument("--pair", nargs=2, type=int)
    environ = {
        "DS_NO_CACHE": "yes",
        "DS_COLOR": "off",
        "DS_VERBOSE": "2",
        "DS_VS": "a b",
        "DS_PAIR": "3 4",
    }
    envflags.apply(parser, environ)
    args = parser.parse_args(["--vs", "c"])
    envflags.resolve(parser, args)
    assert args.cache is False
    assert args.color is False
    assert args.verbose == 2
    assert args.vs == ["a", "b", "c"]
    assert args.pair == [3, 4]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("DS_RING_VERSION", "seven", "DS_RING_VERSION='seven'"),
        ("DS_SYNCHRONOUS", "OFF", "invalid choice"),
    ],
)
def test_bad_value_is_a_usage_error_naming_the_variable(
    name: str, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("ds_cluster.shard.main", SHARD_ARGS, {name: text})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert name in err and message in err


def test_bad_switch_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("ds_cluster.gateway.main", ["--listen", "h:1"], {"DS_REUSE_PORT": "maybe"})
    assert "DS_REUSE_PORT" in capsys.readouterr().err


def test_bad_value_is_ignored_when_the_flag_is_given() -> None:
    args = parse(
        "ds_cluster.shard.main", [*SHARD_ARGS, "--ring-version", "2"], {"DS_RING_VERSION": "seven"}
    )
    assert args.ring_version == 2


def test_every_subcommand_option_has_a_distinct_variable() -> None:
    for module_name, _ in SUBCOMMANDS.values():
        parser = parser_for(module_name, {})
        names = [name for name, _ in envflags.options(parser)]
        assert len(names) == len(set(names)), module_name
        assert all(name.startswith("DS_") and name.isupper() for name in names)
        assert parser.epilog == envflags.EPILOG


def run_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    return subprocess.run(
        [sys.executable, "-m", "ds_cluster", *argv],
        cwd=REPO_ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_real_command_reads_the_environment() -> None:
    done = run_cli(["gateway", "--listen", "127.0.0.1:0"], {"DS_MAX_BODY_BYTES": "lots"})
    assert done.returncode == 2
    assert "environment variable DS_MAX_BODY_BYTES='lots'" in done.stderr
    done = run_cli(["gateway", "--help"], {})
    assert "DS_MAX_BODY_BYTES" in done.stdout and done.returncode == 0
    # --shards from the environment: the gateway gets past parsing to its own check
    secret = {"DS_CLUSTER_SECRET": "s" * 64}
    done = run_cli(["gateway", "--listen", "127.0.0.1:0"], {"DS_SHARDS": "s0=nohost", **secret})
    assert done.returncode == 2
    assert "bad endpoint 's0=nohost'" in done.stderr
