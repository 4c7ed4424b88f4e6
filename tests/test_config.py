import pytest

from xraylens.config import RunConfig
from xraylens.errors import XraylensError


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.override(["train.lr=3e-4", "model.head_hidden=256,64", "data.mean=[0.4]", "train.early_stopping=3"])
    cfg.classes = ["0", "1"]
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    assert back.train.lr == pytest.approx(3e-4)
    assert back.model.head_hidden == [256, 64]
    assert back.data.mean == [0.4]


def test_overrides_are_typed():
    cfg = RunConfig().override(
        ["data.balanced=true", "train.epochs=4", "model.weights=/x/w.pth", "model.train_last=null"]
    )
    assert cfg.data.balanced is True and cfg.train.epochs == 4 and cfg.model.weights == "/x/w.pth"
    assert cfg.model.train_last is None


@pytest.mark.parametrize(
    "bad, words",
    [
        ("train.epochs=1.5", "train.epochs"),
        ("train.nope=1", "unknown train setting 'nope'"),
        ("optim.lr=1", "unknown section"),
        ("lr=1", "section.key=value"),
        ("data.balanced=maybe", "data.balanced"),
    ],
)
def test_bad_overrides_give_one_line_errors(bad, words):
    with pytest.raises(XraylensError) as e:
        RunConfig().override([bad])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(XraylensError, match="not valid YAML"):
        RunConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "unk.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(XraylensError, match="epochz"):
        RunConfig.load(tmp_path / "unk.yaml")
    with pytest.raises(XraylensError, match="not found"):
        RunConfig.load(tmp_path / "missing.yaml")
