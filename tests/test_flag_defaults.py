"""The configuration dataclasses are the one source of the entry scripts' defaults."""
import argparse

import pytest

import main_lincls
import main_moco_mgd
from moco_mgd.evaluation.lincls import LinclsConfig
from moco_mgd.runtime import launch
from moco_mgd.training.config import PretrainConfig


@pytest.mark.parametrize("script, config_class", [(main_moco_mgd, PretrainConfig), (main_lincls, LinclsConfig)])
def test_the_parser_defaults_are_the_dataclass_defaults(script, config_class):
    parser = script.get_args_parser()
    assert launch.config_from_args(config_class, parser.parse_args([])) == config_class()
    # and the help shows them (argparse reads the same action defaults)
    defaults = {a.dest: a.default for a in parser._actions}
    for name, value in launch.config_defaults(config_class).items():
        assert defaults[name] == value, name


def test_the_defaults_are_those_of_mocos_scripts():
    """main_moco.py and main_lincls.py of facebookresearch/moco, the drop-in promise."""
    c = PretrainConfig()
    assert (c.arch, c.workers, c.epochs, c.batch_size, c.lr, c.schedule, c.momentum, c.weight_decay) == \
        ("resnet18", 32, 200, 256, 0.03, [120, 160], 0.9, 1e-4)  # the student default; MoCo's is resnet50
    assert (c.moco_dim, c.moco_k, c.moco_m, c.moco_t, c.mlp, c.aug_plus, c.cos) == \
        (128, 65536, 0.999, 0.07, False, False, False)
    lin = LinclsConfig()
    assert (lin.arch, lin.epochs, lin.batch_size, lin.lr, lin.schedule, lin.momentum, lin.weight_decay) == \
        ("resnet50", 100, 256, 30.0, [60, 80], 0.9, 0.0)


def test_a_field_without_a_flag_is_refused():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int)
    with pytest.raises(TypeError, match="PretrainConfig fields without a command-line flag: data, dataset"):
        launch.set_config_defaults(parser, PretrainConfig)
