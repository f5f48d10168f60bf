"""LLM-jp's checkpoint schedule (dense early, then regular) and pruning that keeps milestones."""

from kumihimo.core import configtree
from kumihimo.pretrain.checkpoint_format import LATEST_FILE, iteration_dir
from kumihimo.pretrain.checkpointing import prune
from kumihimo.pretrain.config import CheckpointConfig


def test_dense_then_regular_schedule():
    config = configtree.from_dict(
        CheckpointConfig, {"dense_intervals": [[9, 1], [100, 10], [1000, 100]], "save_interval": 1000}
    )
    saved = [step for step in range(1, 5001) if config.should_save(step)]
    assert saved[:9] == list(range(1, 10))
    assert saved[9:18] == list(range(10, 100, 10)) and 100 in saved
    assert [s for s in saved if 100 < s <= 1000] == list(range(200, 1001, 100))
    assert [s for s in saved if s > 1000] == [2000, 3000, 4000, 5000]


def test_bad_dense_intervals_are_refused():
    config = configtree.from_dict(CheckpointConfig, {"dense_intervals": [[100, 10], [50, 5]]})
    try:
        config.validate()
    except configtree.ConfigError as exc:
        assert "checkpoint.dense_intervals[1]=[50, 5]" in str(exc)
    else:
        raise AssertionError("decreasing phases were accepted")


def test_prune_keeps_newest_milestones_and_latest(tmp_path):
    for step in (500, 1000, 1100, 1200, 1300, 2000, 2100):
        iteration_dir(tmp_path, step).mkdir()
    (tmp_path / LATEST_FILE).write_text("2100\n")
    iteration_dir(tmp_path, 2200).with_name("iter_0002200.tmp").mkdir()  # an unfinished save is not counted
    deleted = prune(tmp_path, keep_last=2, keep_multiples_of=1000)
    left = sorted(p.name for p in tmp_path.glob("iter_*") if not p.name.endswith(".tmp"))
    assert left == ["iter_0001000", "iter_0002000", "iter_0002100"]
    assert sorted(p.name for p in deleted) == ["iter_0000500", "iter_0001100", "iter_0001200", "iter_0001300"]
