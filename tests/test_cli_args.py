"""The shared --dca-* / --yarn-* command-line switches."""

from __future__ import annotations

import argparse

import pytest

from qwen2_mlx.arguments import add_long_context_args, long_context_overrides
from qwen2_mlx.models.config import ConfigError


def parse(*argv):
    parser = add_long_context_args(argparse.ArgumentParser(prog="tool"))
    return parser, parser.parse_args(list(argv))


def test_nothing_given_changes_nothing():
    parser, args = parse()
    assert long_context_overrides(args, parser) == {"dca": None, "rope_scaling": None}


def test_dca_switches():
    parser, args = parse(
        "--dca-chunk-size", "1024", "--dca-local-size", "256", "--dca-original-max-position-embeddings", "32768"
    )
    assert long_context_overrides(args, parser)["dca"] == {
        "chunk_size": 1024,
        "local_size": 256,
        "original_max_position_embeddings": 32768,
    }
    parser, args = parse("--dca-chunk-size", "8192")
    assert long_context_overrides(args)["dca"]["local_size"] == 1024


def test_yarn_switches():
    parser, args = parse("--yarn-factor", "4", "--yarn-original-max-position-embeddings", "32768")
    assert long_context_overrides(args)["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


@pytest.mark.parametrize(
    "argv,switch",
    [
        (["--dca-local-size", "8"], "--dca-chunk-size"),
        (["--dca-chunk-size", "16", "--dca-local-size", "16"], "local_size"),
        (["--yarn-original-max-position-embeddings", "64"], "--yarn-factor"),
        (["--yarn-factor", "4", "--dca-chunk-size", "64"], "--yarn-factor"),
    ],
)
def test_bad_combinations(argv, switch, capsys):
    parser, args = parse(*argv)
    with pytest.raises(ConfigError, match=switch):
        long_context_overrides(args)
    with pytest.raises(SystemExit) as e:
        long_context_overrides(args, parser)
    assert e.value.code == 2 and switch in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--dca-chunk-size", "0"], ["--dca-chunk-size", "x"], ["--yarn-factor", "-1"]])
def test_bad_values_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
