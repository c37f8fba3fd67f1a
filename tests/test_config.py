"""The options every entry point takes (the README's, the tests', users' scripts'): each parses
to the training config it has always meant, through the one function that applies presets."""

from __future__ import annotations

import pytest

from splatforge.cli import parse
from splatforge.pipeline.generate import SceneEntry, plan_jobs
from splatforge.pipeline.job import train_config
from splatforge.pipeline.run import run_train_config
from splatforge.pipeline.splatter import splatter_train_config
from splatforge.train import TrainConfig
from splatforge.train.presets import preset_train_config

FAST = {"steps": 3000, "max_image_size": 512, "max_gaussians": 300_000, "strategy": "mcmc"}
DEFAULT = {"steps": 30_000, "max_image_size": 1600, "max_gaussians": 1_000_000, "strategy": "mcmc"}


def _train(tmp, *flags):
    return parse(["train", str(tmp), *flags]).config()


def _run(tmp, *flags):
    return run_train_config(parse(["run", str(tmp / "v.mp4"), "--output", str(tmp / "r"), *flags]))


def _splatter(tmp, *flags):
    return splatter_train_config(parse(["splatter", "--job_root_path", str(tmp), *flags]))


def _generate(tmp, *flags):
    cfg = parse(["generate", "--dataset-root", str(tmp), "--output-dir", str(tmp / "o"), *flags])
    return train_config(plan_jobs(cfg, [SceneEntry(name="s", root=tmp, subset="", data_factor=1, ready=True)])[0])


CASES = [  # (entry point, flags, expected fields; dotted names reach into sub-configs)
    (_train, [], FAST),
    (_train, ["--preset", "default"], DEFAULT),
    (_train, ["--steps", "123"], {**FAST, "steps": 123}),
    (_train, ["--max-gaussians", "5000"], {**FAST, "max_gaussians": 5000}),
    (_train, ["--strategy", "default"], {**FAST, "strategy": "default"}),
    (_train, ["--mcmc.cap-max", "7000"], {**FAST, "mcmc.cap_max": 7000}),
    (
        _train,
        ["--densify.refine-stop-iter", "900", "--densify.absgrad"],
        {"densify.refine_stop_iter": 900, "densify.absgrad": True},
    ),
    (_train, ["--data-factor", "4", "--preset", "quality"], {"data_factor": 4, "max_image_size": 0, "steps": 30_000}),
    (_run, [], FAST),
    (_run, ["--steps", "50", "--cap-max", "9000"], {**FAST, "steps": 50, "max_gaussians": 9000}),
    (_run, ["--preset", "default", "--max-image-size", "0"], {**DEFAULT, "max_image_size": 0}),
    (_run, ["--checkpoint-every", "50", "--exposure"], {"checkpoint_every": 50, "exposure": True}),
    (_splatter, [], {**FAST, "test_every": 8}),
    (_splatter, ["--max_gaussians", "8000"], {**FAST, "max_gaussians": 8000}),
    (_splatter, ["--max-gaussians", "8000", "--steps", "40"], {**FAST, "max_gaussians": 8000, "steps": 40}),
    (_splatter, ["--data_factor", "2"], {"data_factor": 2, "max_image_size": 0}),
    (_splatter, ["--strategy", "default", "--test_every", "0"], {"strategy": "default", "test_every": 0}),
    (_generate, [], {**FAST, "max_image_size": 0, "split_ratio": 0.1}),
    (
        _generate,
        ["--cap-max", "9000", "--steps", "77", "--strategy", "default"],
        {"max_gaussians": 9000, "steps": 77, "strategy": "default", "checkpoint_every": 100},
    ),
]


def _get(cfg: TrainConfig, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("entry,flags,expected", CASES, ids=[f"{c[0].__name__[1:]} {' '.join(c[1])}" for c in CASES])
def test_contract_flags_parse_to_the_same_config(tmp_path, entry, flags, expected):
    cfg = entry(tmp_path, *flags)
    assert isinstance(cfg, TrainConfig)
    assert {k: _get(cfg, k) for k in expected} == expected


def test_the_preset_builder_never_replaces_a_given_value_nor_mutates():
    given = {"steps": 10, "max_image_size": 0, "densify": None}
    cfg = preset_train_config("quality", data="x", **given)
    assert (cfg.steps, cfg.max_image_size, cfg.max_gaussians) == (10, 0, 3_000_000)
    assert given == {"steps": 10, "max_image_size": 0, "densify": None}
