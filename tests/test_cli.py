"""The command lines generated from config dataclasses (``train.cli``) for the benchmarks."""

import pytest

from benchmarks import __main__ as suite
from benchmarks import cdv_gradient_scales, sharding, step_time


def test_lists_take_commas_spaces_or_both():
    assert step_time.parse_args(["--methods", "floor,cdvft"]).methods == ("floor", "cdvft")
    assert step_time.parse_args(["--methods", "floor", "cdvft", "lora"]).methods == ("floor", "cdvft", "lora")
    assert sharding.parse_args(["--devices", "1,2", "8"]).devices == (1, 2, 8)


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (step_time.parse_args, ["--methods", "floor,dora"], "--methods must be distinct names out of full,head"),
        (step_time.parse_args, ["--methods", "cdvft,cdvft"], "--methods must be distinct names"),
        (step_time.parse_args, ["--batch", "0"], "--batch must be a positive int, got 0"),
        (step_time.parse_args, ["--warmup", "-1"], "--warmup must be an int >= 0, got -1"),
        (sharding.parse_args, ["--devices", "3"], "unsupported device counts [3]"),
        (sharding.parse_args, ["--steps", "0"], "--steps must be a positive int"),
        (cdv_gradient_scales.main, ["--rates", "0.1,0"], "--rates must be distinct numbers > 0"),
        (suite.parse_args, ["--json", "x.json", "--quick", "--tiny"], "--quick and --tiny are two modes"),
        (suite.parse_args, ["--json", "x.json", "--parts", "speed"], "--parts must be distinct names"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_flag(main, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_the_suite_mode_sets_the_train_step_defaults_and_flags_override_them():
    full = suite.parse_args(["--json", "x.json"])
    quick = suite.parse_args(["--json", "x.json", "--quick"])
    tiny = suite.parse_args(["--json", "x.json", "--small"])
    for config, mode in ((full, "full"), (quick, "quick"), (tiny, "tiny")):
        assert config.mode == mode
        for name in suite.STEP_SETTINGS:
            if name in suite.MODES[mode]:
                assert getattr(config, name) == suite.MODES[mode][name], (mode, name)
    assert (full.layers, quick.layers, quick.rss, tiny.small) == (None, 2, False, True)
    given = suite.parse_args(["--json", "x.json", "--quick", "--layers", "3", "--rss", "--repeats", "7"])
    step = given.step_config("vit-base")
    assert (step.model, step.layers, step.rss, step.repeats, step.warmup) == ("vit-base", 3, True, 7, 1)
