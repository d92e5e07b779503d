"""``python -m pipeline.backbones NAME`` (pipeline/backbones/__main__.py): the values ``finetune.unfreeze_from``
takes for a backbone, the share of its weights each one trains, and which one ``auto`` means."""
import re

import pytest

from pipeline.backbones.__main__ import main


def test_the_listing_marks_the_auto_boundary_and_each_share(capsys):
    main(["mobilenet_v2"])
    out = capsys.readouterr().out
    assert "2,257,984 weights" in out
    assert re.search(r"block_13_expand +73\.7% +<- auto", out) and re.search(r"Conv_1 +18\.1%\n", out), out


def test_an_unknown_backbone_is_refused_listing_the_names(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["resnet18"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'resnet18'" in err and "efficientnet_lite0" in err and "mobilenet_v2" in err, err
