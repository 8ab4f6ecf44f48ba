"""One GenerationSettings for predict, eval, chat and serve: what it records, what it refuses, what generate() gets."""

from __future__ import annotations

import argparse

import pytest

from medtune.console import MedtuneError
from medtune.infer.generation import GenerationSettings, add_generation_arguments, generation_from_args


def test_greedy_records_what_predict_recorded_before_so_old_files_still_resume() -> None:
    """predict's fingerprint held max_new_tokens and do_sample (and temperature/top_p when sampling): a results
    file written before GenerationSettings resumes under the same settings."""
    assert GenerationSettings().recorded() == {"max_new_tokens": 256, "do_sample": False}
    greedy_with_seed = GenerationSettings(seed=3, temperature=0.1)  # neither changes a greedy reply
    assert greedy_with_seed.recorded() == {"max_new_tokens": 256, "do_sample": False}
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.5, top_p=0.8, seed=7)
    assert sampled.recorded() == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "seed": 7}
    assert "batch_size" not in GenerationSettings(batch_size=3).recorded()  # batching does not change a reply


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (GenerationSettings(batch_size=0), "--batch-size and --max-new-tokens must be at least 1"),
        (GenerationSettings(max_new_tokens=0), "--batch-size and --max-new-tokens must be at least 1"),
        (GenerationSettings(do_sample=True, temperature=0.0), "--temperature must be positive"),
        (GenerationSettings(do_sample=True, top_p=1.5), "--top-p in (0, 1]"),
    ],
)
def test_impossible_settings_are_one_error_naming_the_option(settings: GenerationSettings, message: str) -> None:
    with pytest.raises(MedtuneError) as caught:
        settings.check()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_greedy_with_a_zero_temperature_is_fine() -> None:
    assert GenerationSettings(temperature=0.0).check().do_sample is False


def test_generate_keywords_carry_sampling_only_when_sampling() -> None:
    greedy = GenerationSettings(max_new_tokens=5).generate_kwargs(pad_id=0, stop_ids=[2, 7])
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": [2, 7]}
    sampled = GenerationSettings(do_sample=True, temperature=0.3, top_p=0.5).generate_kwargs(0, [2])
    assert sampled["temperature"] == 0.3 and sampled["top_p"] == 0.5 and sampled["do_sample"] is True


def test_the_command_line_options_build_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser, max_new_tokens=64)
    args = parser.parse_args(["--do-sample", "--temperature", "0.2", "--seed", "5", "--batch-size", "3"])
    assert generation_from_args(args) == GenerationSettings(64, True, 0.2, 0.9, 5, 3)
    greedy_only = argparse.ArgumentParser()
    add_generation_arguments(greedy_only, max_new_tokens=64, sampling=False)
    with pytest.raises(SystemExit):  # eval exam answers greedily: no --do-sample to give
        greedy_only.parse_args(["--do-sample"])
    assert generation_from_args(greedy_only.parse_args([])) == GenerationSettings(max_new_tokens=64)
