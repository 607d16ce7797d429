"""The augmentation benchmark (benchmarks/augmentation.py) end to end at a tiny size: 100 pydoc chunks encoded by
MiniLM, 32 labeled pairs, a 64-wide generator, 2 seeds, through its command line; the quick and full runs belong to
`python -m benchmarks.augmentation`."""
import contextlib
import io
import json

import pytest
import torch

from benchmarks import augmentation as aug
from benchmarks.common import RESULTS_ROOT

TINY = {"chunks": 100, "labeled": 32, "seeds": 2, "hidden_dim": 64, "num_layers": 2, "diffusion_steps": 300,
        "diffusion_batch": 32, "retriever_steps": 30}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """(results dict, stdout, out folder) of `--quick` with the quick size replaced by TINY."""
    out = tmp_path_factory.mktemp("augmentation")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setitem(aug.SIZES, "quick", TINY)
        assert aug.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    return json.loads((out / "results-quick.json").read_text()), stdout.getvalue(), out


def test_the_run_reports_every_arm_with_recalls_over_its_seeds(tiny_run):
    result, stdout, _ = tiny_run
    assert result["suite"] == "augmentation" and result["size"] == "quick" and result["seeds"] == [0, 1]
    data = result["data"]
    assert data["chunks"] == 100 and data["labeled"] == 32 and data["pool"] + data["test_queries"] == 100
    assert [row["method"] for row in result["rows"]] == list(aug.ARMS)
    for row in result["rows"]:
        for k in aug.KS:
            metric = row[f"recall@{k}"]
            assert len(metric["seeds"]) == 2 and all(0 <= v <= 1 for v in metric["seeds"]), row
            assert metric["mean"] == pytest.approx(sum(metric["seeds"]) / 2) and metric["std"] >= 0
        assert row["method"] in stdout
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["real"]["recall@1"]["delta_vs_real"] == {"mean": 0.0, "std": 0.0}
    assert rows["real"]["pairs"] == [32, 32] and rows["real + true (all)"]["pairs"] == [data["pool"]] * 2
    # the task is data-limited: the whole pool's true pairs beat the 32 labeled ones
    assert rows["real + true (all)"]["recall@1"]["mean"] > rows["real"]["recall@1"]["mean"]
    references = {r["method"]: r for r in result["references"]}
    assert references["MiniLM (no training)"]["recall@1"] > references["rotated tower (untrained)"]["recall@1"]
    assert set(result["seconds"]) == {"encode", "diffusion", "retriever", "total"}
    assert result["environment"]["cpu_threads"] == 1


def test_synthetic_pairs_are_accepted_and_handed_to_the_learner(tiny_run):
    result, _, _ = tiny_run
    rows = {row["method"]: row for row in result["rows"]}
    for seed, synthetic in enumerate(result["synthetic"]):
        n = synthetic["accepted"]
        assert 0 < n <= synthetic["unlabeled_conditions"] == result["data"]["pool"] - 32, synthetic
        assert synthetic["observed"] == n and synthetic["dropped"] == 0  # hand_over put every accepted pair in
        # the synthetic, jitter and matched-true arms train on the same number of pairs
        assert rows["real + synthetic"]["pairs"][seed] == rows["real + jitter"]["pairs"][seed] == \
            rows["real + true (acc.)"]["pairs"][seed] == 32 + n
        # the copy test keeps a subset of the same filter's samples, all of them handed over
        copies = synthetic["accepted_copy_test"]
        assert 0 <= copies <= n and synthetic["observed_copy_test"] == copies
        assert rows["real + synthetic (copy test)"]["pairs"][seed] == 32 + copies
        assert -1 <= synthetic["copy_bound_mean"] <= 1
        assert synthetic["cos_condition"] >= aug.MIN_SIMILARITY  # what the filter demands
        assert synthetic["cos_nearest_labeled"] <= aug.MAX_CORPUS_SIMILARITY
        for key in ("own_chunk_nearest", "labeled_chunk_nearest", "condition_own_chunk_nearest"):
            assert 0 <= synthetic[key] <= 1


def test_the_plot_is_a_png(tiny_run):
    _, stdout, out = tiny_run
    png = out / "augmentation-quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in stdout


def test_jittered_copies_are_unit_rows_near_their_originals():
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(5, 384, generator=generator), dim=1)
    positives = torch.nn.functional.normalize(torch.randn(5, 384, generator=generator), dim=1)
    jq, jp = aug.jittered(queries, positives, 12, torch.Generator().manual_seed(1))
    assert jq.shape == jp.shape == (12, 384)
    assert torch.allclose(jq.norm(dim=1), torch.ones(12)) and torch.allclose(jp.norm(dim=1), torch.ones(12))
    best_q, source = (jq @ queries.T).max(dim=1)
    best_p = (jp * positives[source]).sum(dim=1)  # each positive is jittered from the same pair as its query
    expected = (1 + aug.JITTER ** 2) ** -0.5  # a unit row plus noise of norm JITTER, renormalised
    assert (best_q - expected).abs().max() < 0.06 and (best_p - expected).abs().max() < 0.06
    assert sorted(torch.bincount(source, minlength=5).tolist()) == [2, 2, 2, 3, 3]  # cycled: 12 = 2 x 5 + 2


def test_the_query_tower_starts_at_a_seeded_rotation():
    a, b, other = aug.make_retriever(16, 3), aug.make_retriever(16, 3), aug.make_retriever(16, 4)
    w = a.query_tower.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5) and not torch.allclose(w, torch.eye(16))
    assert torch.equal(w, b.query_tower.weight) and not torch.equal(w, other.query_tower.weight)
    assert torch.equal(a.document_tower.weight, torch.eye(16)) and not a.log_temperature.requires_grad


@pytest.mark.parametrize("argv, message", [(["--threads", "0"], "--threads must be >= 1"),
                                           (["--quick", "--record"], "--record records the full size"),
                                           (["--out", str(RESULTS_ROOT / "x")], "lies inside")])
def test_the_command_line_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        aug.main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as error:
        aug.main(["--help"])
    assert error.value.code == 0 and "--quick" in capsys.readouterr().out
