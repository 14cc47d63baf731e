"""Every command-line tool refuses a bad number naming the option, before it loads,
compiles or connects (they used to fail later with a traceback, or never end)."""

from __future__ import annotations

import argparse
import re
import sys

import pytest

from serve_app import cli
from serve_app.cli_args import finite, integer, positive_ints, seconds

from .script_modules import load_script


def parsed(type_, text: str):
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=type_)
    return parser.parse_args(["--x", text]).x


@pytest.mark.parametrize(("type_", "text", "value"), [
    (positive_ints, "4, 1,,2,4", [1, 2, 4]),
    (integer(0), "0", 0),
    (seconds(), "0.5", 0.5),
    (seconds(zero=True), "0", 0.0),
    (finite, "-3", -3.0),
])
def test_good_values_pass(type_, text, value):
    assert parsed(type_, text) == value


@pytest.mark.parametrize(("type_", "text", "reason"), [
    (positive_ints, "1,a", "positive integers, comma-separated (e.g. 1,2,4), got '1,a'"),
    (positive_ints, "0,2", "positive integers, comma-separated (e.g. 1,2,4), got '0,2'"),
    (positive_ints, ",", "positive integers, comma-separated (e.g. 1,2,4), got ','"),
    (integer(1), "0", "an integer of at least 1, got '0'"),
    (integer(1), "1.5", "an integer of at least 1, got '1.5'"),
    (seconds(), "0", "seconds, a finite number more than 0, got '0'"),
    (seconds(), "nan", "seconds, a finite number more than 0, got 'nan'"),
    (seconds(zero=True), "-1", "seconds, a finite number at least 0, got '-1'"),
    (seconds(zero=True), "inf", "seconds, a finite number at least 0, got 'inf'"),
    (finite, "nan", "a finite number, got 'nan'"),
    (finite, "x", "a finite number, got 'x'"),
])
def test_bad_values_are_refused_with_the_reason(type_, text, reason):
    with pytest.raises(argparse.ArgumentError, match="argument --x: " + re.escape(reason)):
        parsed(type_, text)


@pytest.mark.parametrize(("tool", "args", "told"), [
    # a NaN duration ran for ever; -3 s and NaN crashed after connecting
    ("mrt-serve", ["jam", "--seconds", "nan", "--out", "x.wav"],
     "argument --seconds: seconds, a finite number more than 0, got 'nan'"),
    ("mrt-serve", ["jam", "--seconds", "-3", "--out", "x.wav"], "got '-3'"),
    ("mrt-serve", ["jam", "--update-at", "nan", "--out", "x.wav"], "argument --update-at:"),
    ("mrt-serve", ["generate", "--seconds", "nan", "--out", "x.wav"], "argument --seconds:"),
    ("mrt-serve", ["generate", "--topk", "0", "--out", "x.wav"],
     "argument --topk: an integer of at least 1, got '0'"),
    ("bench_serve", ["--url", "ws://127.0.0.1:1", "--json", "b.json", "--sessions", "a"],
     "argument --sessions: positive integers"),
    ("bench_serve", ["--url", "ws://127.0.0.1:1", "--json", "b.json", "--seconds", "nan"],
     "argument --seconds:"),
    ("bench_serve", ["--url", "ws://127.0.0.1:1", "--json", "b.json", "--chunk-seconds", "0"],
     "argument --chunk-seconds:"),
    # no median for empty data; a batch of 0 crashed in the engine
    ("bench_engine", ["--frames", "0"], "argument --frames: an integer of at least 1"),
    ("bench_engine", ["--batch", "0"], "argument --batch: positive integers"),
    ("bench_prefill", ["--repeats", "0"], "argument --repeats:"),
])
def test_each_tool_refuses_a_bad_number_before_it_starts(tool, args, told, monkeypatch, capsys,
                                                         tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        if tool == "mrt-serve":
            cli.main(args)
        else:
            monkeypatch.setattr(sys, "argv", [f"{tool}.py", *args])
            load_script(tool).main()
    assert refused.value.code == 2
    assert told in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
